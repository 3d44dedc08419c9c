"""Borrowing memory through the daemon on libvirt's test driver (no guest lock needed;
docs/borrowing.md "Borrowing memory"). The test driver's domains report balloon figures of half
their memory (MemAvailable and QEMU resident: a 384 MiB owner has 192 MiB spare), so with
`memory: balloon` and a 32 MiB margin an idle owner of both usable cpus and 384 of node 0's
512 MiB lends its second core and memory beside it: a 1-cpu 256 MiB borrower takes the 128
MiB free and borrows
128 MiB. `show`, the store and the metrics say so, and when the owner ends the borrower holds
its memory itself. Giving memory back needs an owner whose use really rises:
tests/daemon/test_balloon_guests.py."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.daemon.test_lending_testdriver import _state
from tests.daemon.test_remote import free_port, scrape

# cpus 0-1 usable (node 0); 1536 MiB reserved per node leaves node 0 512 MiB
HOST = {"name": "t", "uri": "test:///default", "reserved_cpus": "2-15",
        "reserved_memory": "3072M"}
BORROW = {"idle_below": 0.5, "for": "2s", "give_back_within": "4s", "memory": "balloon",
          "memory_margin": "32M"}


def test_an_idle_owner_lends_memory_its_balloon_reports_spare(make_daemon: Any) -> None:
    port = free_port()
    daemon = make_daemon("memlend-td", hosts=[HOST], usage_sample_interval=1,
                         usage_window="5s", borrow=BORROW, metrics_port=port)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["true"], "cpus": 2, "mem": "384M"})["id"]
    _state(client, owner, "RUNNING", daemon)
    borrower = client.submit({"argv": ["true"], "cpus": 1, "mem": "256M", "borrow": True})["id"]
    view = _state(client, borrower, "RUNNING", daemon, timeout=60)
    assert view["loans"] == [{"host": "t", "cpu": 1, "owner": owner, "borrower": borrower}]
    assert view["memory_loans"] == [{"host": "t", "node": 0, "mib": 128, "owner": owner,
                                     "borrower": borrower}]
    assert view["allocation"]["memory_mib"] == 256  # its guest has all of it
    placed = [e["reason"] for e in view["events"] if "placed on lent" in (e["reason"] or "")]
    assert placed and f"128 MiB of job {owner}" in placed[0], view["events"]
    owner_view = client.job(owner)
    assert owner_view["memory_loans"] == view["memory_loans"]
    assert any(f"lends 128 MiB of node 0 to job {borrower}" in (e["reason"] or "")
               for e in owner_view["events"])
    # the balloon's figures, read by the sampler: 384 MiB - 192 MiB MemAvailable used
    assert owner_view["memory_used_mib"] == 192
    assert owner_view["memory_resident_mib"] == 192
    shown = daemon.vmjob("show", borrower).stdout
    assert f"t node 0 128 MiB: job {owner}'s memory, lent to job {borrower}" in shown
    metrics = scrape(port)
    assert metrics['vmjobs_host_memory_lent_bytes{host="t"}'] == 128 << 20
    assert metrics[f'vmjobs_job_memory_used_bytes{{host="t",job="{owner}"}}'] == 192 << 20
    assert metrics[f'vmjobs_job_memory_held_bytes{{host="t",job="{owner}"}}'] == 384 << 20
    # the engine counts the borrower without its borrowed memory: node 0 is exactly full
    hosts = json.loads(daemon.vmjob("hosts", "--json").stdout)
    node0 = next(n for n in hosts[0]["nodes"] if n["node"] == 0)
    assert node0["memory_free_mib"] == 0

    assert client.cancel(owner)["state"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while daemon.query("SELECT COUNT(*) FROM memory_loans")[0][0]:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    assert client.job(borrower)["state"] == "RUNNING"  # it stays, holding its own memory
    hosts = json.loads(daemon.vmjob("hosts", "--json").stdout)
    node0 = next(n for n in hosts[0]["nodes"] if n["node"] == 0)
    assert node0["memory_free_mib"] == 512 - 256
    client.cancel(borrower)
    assert daemon.reservations() == 0
    client.close()
    daemon.stop()
