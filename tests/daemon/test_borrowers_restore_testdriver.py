"""A waiting `--borrow` job does not hold back the automatic restore of a checkpointed job
(docs/borrowing.md, "Lending"), on libvirt's test driver (no guest lock): a borrower that can
never fit while an owner runs waits, never first in line, while the restore of a preempted
job is tried on the core that frees."""

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
