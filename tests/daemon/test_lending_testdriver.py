"""Lending through the daemon on libvirt's test driver (no guest lock needed): a job's domain
"runs" there without a hypervisor and its vCPUs count about a tenth of a core each, so with
`idle_below: 0.5` they are idle. Two usable cpus: an owner of both lends its second to a
`--borrow` job, `show`, `hosts` and the metrics say so, and the core passes to the borrower
when the owner ends; a `--no-lend` owner lends nothing. Giving back needs an owner that
really gets busy: tests/daemon/test_lending_guests.py."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.daemon.test_remote import free_port, scrape

HOST = {"name": "t", "uri": "test:///default", "reserved_cpus": "2-15"}  # cpus 0-1 usable
BORROW = {"idle_below": 0.5, "for": "2s", "give_back_within": "4s"}


def _state(client: Any, job_id: str, want: str, daemon: Any, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (view := client.job(job_id))["state"] != want:
        assert time.monotonic() < deadline, f"{job_id}: {view['state']}\n{daemon.log_text()}"
        time.sleep(0.1)
    return view


def test_an_idle_owner_lends_a_core_and_hands_it_over_when_it_ends(make_daemon: Any) -> None:
    port = free_port()
    daemon = make_daemon("lend-td", hosts=[HOST], usage_sample_interval=1, usage_window="5s",
                         borrow=BORROW, metrics_port=port)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["true"], "cpus": 2, "mem": "256M"})["id"]
    _state(client, owner, "RUNNING", daemon)
    borrower = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M", "borrow": True})["id"]
    assert client.job(borrower)["state"] == "QUEUED"  # no free core: it waits for a loan
    view = _state(client, borrower, "RUNNING", daemon, timeout=60)
    assert view["loans"] == [{"host": "t", "cpu": 1, "owner": owner, "borrower": borrower}]
    assert view["allocation"]["cpus"] == [1]
    assert any("placed on lent cores" in (e["reason"] or "") for e in view["events"])
    owner_view = client.job(owner)
    assert owner_view["loans"] == view["loans"]
    assert any(f"lends cpu 1 to job {borrower}" in (e["reason"] or "")
               for e in owner_view["events"])
    # the owner still holds both cpus; the loan is a row of its own
    rows = daemon.query("SELECT cpu, job_id FROM cpu_reservations ORDER BY cpu")
    assert [(r["cpu"], r["job_id"]) for r in rows] == [(0, owner), (1, owner)]

    hosts = json.loads(daemon.vmjob("hosts", "--json").stdout)
    assert hosts[0]["loans"] == [{"cpu": 1, "owner": owner, "borrower": borrower}]
    table = daemon.vmjob("hosts").stdout
    assert f"{owner} -> {borrower}" in table and "lent" in table
    shown = daemon.vmjob("show", borrower).stdout
    assert f"t cpu 1: job {owner}'s, lent to job {borrower}" in shown
    assert scrape(port)['vmjobs_host_cores_lent{host="t"}'] == 1

    assert client.cancel(owner)["state"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while daemon.query("SELECT COUNT(*) FROM loans")[0][0]:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    rows = daemon.query("SELECT cpu, job_id FROM cpu_reservations ORDER BY cpu")
    assert [(r["cpu"], r["job_id"]) for r in rows] == [(1, borrower)]  # it stays where it runs
    assert client.job(borrower)["state"] == "RUNNING"
    client.cancel(borrower)
    assert daemon.reservations() == 0
    client.close()
    daemon.stop()


def test_a_no_lend_owner_lends_nothing(make_daemon: Any) -> None:
    daemon = make_daemon("nolend-td", hosts=[HOST], usage_sample_interval=1, usage_window="5s",
                         borrow=BORROW)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["true"], "cpus": 2, "mem": "256M", "no_lend": True})["id"]
    _state(client, owner, "RUNNING", daemon)
    borrower = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M", "borrow": True})["id"]
    # the sampler has measured the owner idle for longer than `for` (2 s), several times over
    deadline = time.monotonic() + 60
    while client.job(owner)["cpu_used_cores"] is None:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.2)
    time.sleep(6)
    assert client.job(borrower)["state"] == "QUEUED"
    assert daemon.query("SELECT COUNT(*) FROM loans")[0][0] == 0
    client.cancel(owner)
    _state(client, borrower, "RUNNING", daemon)  # free cores now: the ordinary queue
    assert client.job(borrower)["loans"] == []
    client.cancel(borrower)
    client.close()
    daemon.stop()
