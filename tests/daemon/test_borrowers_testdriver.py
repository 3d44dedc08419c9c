"""Borrowers through the daemon on libvirt's test driver (no guest lock; docs/borrowing.md):

- a waiting `--borrow` job does not hold back the automatic restore of a checkpointed job: a
  borrower that cannot fit while an owner runs waits, never first in line, while the restore
  of a preempted job is tried on the core that frees;
- resizing an owner that lends is refused, and sends its borrower off first (checkpointed
  here: the host has no other free core)."""

from __future__ import annotations

import time
from typing import Any

from tests.daemon.test_lending_testdriver import BORROW, HOST, _state
from vmjobs.daemon.queue import BORROWER_WAITS


def test_a_waiting_borrower_does_not_hold_back_a_restore(make_daemon: Any) -> None:
    daemon = make_daemon("borrow-restore", hosts=[HOST], usage_sample_interval=1,
                         usage_window="5s", borrow=BORROW, preemption=True)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M", "no_lend": True})["id"]
    _state(client, owner, "RUNNING", daemon)
    preemptible = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M",
                                 "preemptible": True})["id"]
    _state(client, preemptible, "RUNNING", daemon)
    guaranteed = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M"})["id"]
    _state(client, preemptible, "CHECKPOINTED", daemon)  # preempted for it
    _state(client, guaranteed, "RUNNING", daemon)
    # a 2-cpu borrower: it cannot fit while the owner (which lends nothing) runs
    borrower = client.submit({"argv": ["true"], "cpus": 2, "mem": "128M", "borrow": True})["id"]
    client.cancel(guaranteed)
    # the freed core goes back to the preempted job, although the borrower waits: its
    # automatic restore is tried (the test driver cannot restore a guest running, no
    # VIR_DOMAIN_SAVE_RUNNING, so the attempt ends in "restore it by hand": that is the sign)
    deadline = time.monotonic() + 60
    while not any("automatic restore failed" in (e["reason"] or "")
                  for e in client.job(preemptible)["events"]):
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.2)
    assert "PLACED" in [e["state"] for e in client.job(preemptible)["events"]][-4:]
    view = client.job(borrower)
    assert view["state"] == "QUEUED"
    assert view["waiting_because"].startswith(BORROWER_WAITS), view["waiting_because"]
    for job_id in (preemptible, borrower, owner):
        client.cancel(job_id)
    client.close()
    daemon.stop()


def test_resizing_a_lending_owner_sends_its_borrower_off_first(make_daemon: Any) -> None:
    daemon = make_daemon("lend-resize", hosts=[HOST], usage_sample_interval=1,
                         usage_window="5s", borrow=BORROW)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["true"], "cpus": 2, "mem": "256M"})["id"]
    _state(client, owner, "RUNNING", daemon)
    borrower = client.submit({"argv": ["true"], "cpus": 1, "mem": "128M", "borrow": True})["id"]
    _state(client, borrower, "RUNNING", daemon)
    assert [x["cpu"] for x in client.job(borrower)["loans"]] == [1]

    refused = daemon.vmjob("resize", owner, "--cpus", "1")
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"vmjob: job {owner} lends 1 of its cpus to borrowers; they are being given back now: "
        "ask the resize again once 'vmjob show' lists no loans"]
    view = _state(client, borrower, "CHECKPOINTED", daemon)  # no other free core
    assert any(f"giving back cpu 1 of job {owner}: its owner is being resized"
               in (e["reason"] or "") for e in view["events"]), view["events"]
    assert daemon.query("SELECT COUNT(*) FROM loans")[0][0] == 0
    rows = daemon.query("SELECT cpu, job_id FROM cpu_reservations ORDER BY cpu")
    assert [(r["cpu"], r["job_id"]) for r in rows] == [(0, owner), (1, owner)]
    assert client.job(owner)["state"] == "RUNNING"
    for job_id in (borrower, owner):
        client.cancel(job_id)
    client.close()
    daemon.stop()
