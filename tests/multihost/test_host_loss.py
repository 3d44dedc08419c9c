"""Lost hosts on the 3-host dev cluster, through the daemon and the CLI: each job follows its
`--on-host-loss` policy when its host loses power (`devcluster.power_off`: the link cut first,
so no TCP close reaches the daemon, then libvirtd and the guests killed, the address gone) and
stays away for `host_down_after`. Two hosts go a second apart: both must be declared down.
Real guests (TCG).

Run under the guest lock with a spool of your own:
    flock /tmp/vmjobs-guest.lock env VMJOBS_MULTIHOST_SPOOL=... python3 -m pytest \
        tests/multihost/test_host_loss.py
"""

from __future__ import annotations

import re
import time

import pytest

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import NAME, SPOOL, SUBNET, Cluster
from tests.multihost.test_moves_daemon import (  # the daemon fixture: one per test
    _show,
    _submit,
    _wait_output,
    _wait_state,
    daemon,  # noqa: F401
)
from vmjobs import devcluster

# numbered lines (120, 0.5 s or 0.25 s apart under TCG): long enough to outlive the losses
COUNTER = ("i=0; while [ $i -lt {n} ]; do echo {word} $i; i=$((i+1)); usleep {us}; done; "
           "echo done")


def _numbers(text: str, word: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^{word} (\d+)$", text, re.MULTILINE)]


def _events(view: dict) -> list[tuple[str, str]]:
    return [(e["state"], e["reason"] or "") for e in view["events"]]


def _transitions(view: dict) -> list[str]:
    """The job's states, in order, without notes: a note repeats the state it is made in (a
    periodic checkpoint that failed on the dead host is an UNREACHABLE note)."""
    return [e["state"] for e in view["events"] if not e["note"]]


def _wait_event(served: Daemon, job: str, needle: str, after: float = 0.0,
                timeout: float = 120) -> dict:
    """The job's view once an event recorded after `after` (time.time()) mentions `needle`."""
    deadline = time.monotonic() + timeout
    while True:
        view = _show(served, job)
        if any(needle in (e["reason"] or "") and e["time"] > after for e in view["events"]):
            return view
        assert time.monotonic() < deadline, f"{job}: no event with {needle!r}: " \
            f"{_events(view)}\n{served.log_text()}"
        time.sleep(0.3)


@pytest.mark.daemon_config(host_down_after="4s")
def test_lost_hosts_requeue_restore_and_fail_per_policy(cluster: Cluster,
                                                         daemon: Daemon) -> None:  # noqa: F811
    # h2 takes the requeue and restore jobs, h3 the fail job; h1 stays, empty, for after
    for host in ("h1", "h3"):
        assert daemon.vmjob("drain", host).returncode == 0
    try:
        restore = _submit(daemon, "--on-host-loss", "restore", "--checkpoint-every", "5s",
                          "--", "sh", "-c", COUNTER.format(n=120, word="count", us=500000))
        requeue = _submit(daemon, "--on-host-loss", "requeue", "--",
                          "sh", "-c", COUNTER.format(n=120, word="line", us=250000))
        assert daemon.vmjob("uncordon", "h3").returncode == 0
        fail = _submit(daemon, "--host", "h3", "--on-host-loss", "fail", "--",
                       "sh", "-c", "echo up; sleep 300")
        for job, host in ((restore, "h2"), (requeue, "h2"), (fail, "h3")):
            assert _wait_state(daemon, job, "RUNNING", timeout=180)["host"] == host
        assert daemon.vmjob("uncordon", "h1").returncode == 0
        _wait_output(daemon, fail, "up", timeout=120)
        _wait_output(daemon, requeue, "line 3", timeout=120)

        # a periodic checkpoint of the restore job once its counter runs (the first may come
        # before the job printed anything: the guest boots for seconds under TCG), output
        # after it; then h2 and, a second later, h3 lose power. Both must be declared down
        # (with libvirt's keepalive and close callback alone, the second one once was not:
        # docs/borrowing.md, "Lost hosts")
        _wait_output(daemon, restore, "count 2", timeout=120)
        counting = time.time()
        checkpointed = _wait_event(daemon, restore, "periodic checkpoint", after=counting)
        assert checkpointed["state"] == "RUNNING"  # it ran on through the checkpoint
        before = _numbers(daemon.vmjob("logs", restore).stdout, "count")
        _wait_output(daemon, restore, f"count {before[-1] + 2}", timeout=60)
        time.sleep(0.5)
        lost_at = time.time()
        devcluster.power_off(NAME, "h2")
        time.sleep(1.0)
        devcluster.power_off(NAME, "h3")

        # fail: LOST, as without the policy
        view = _wait_state(daemon, fail, "LOST", timeout=120)
        assert view["message"].startswith("host h3 lost"), view["message"]
        states = _transitions(view)
        assert states[-2:] == ["UNREACHABLE", "LOST"], _events(view)
        lost = view["events"][-1]["time"]
        assert 3.5 < lost - lost_at < 90, _events(view)

        # requeue: the same job back in the queue, then run whole on h1
        view = _wait_state(daemon, requeue, "COMPLETED", timeout=240)
        assert view["host"] == "h1" and view["exit_code"] == 0
        states = _transitions(view)
        assert states.count("UNREACHABLE") == 1, _events(view)
        after_loss = states[states.index("UNREACHABLE"):]
        assert after_loss[:2] == ["UNREACHABLE", "QUEUED"], _events(view)
        assert "PLACED" in after_loss and after_loss[-1] == "COMPLETED", _events(view)
        requeued = [r for s, r in _events(view) if s == "QUEUED" and "host h2 lost" in r]
        assert requeued and "--on-host-loss requeue" in requeued[0], _events(view)
        queued_at = next(e["time"] for e in view["events"]
                         if e["state"] == "QUEUED" and "host h2 lost" in (e["reason"] or ""))
        assert 3.5 < queued_at - lost_at < 90
        text = daemon.vmjob("logs", requeue).stdout
        first, marker, second = text.partition("the job runs again from the start")
        assert marker, text
        lost_run = _numbers(first, "line")
        assert lost_run and lost_run == list(range(len(lost_run))), first
        assert _numbers(second, "line") == list(range(120)) and second.rstrip().endswith(
            "done"), second

        # restore: from the periodic checkpoint on h1; its counter goes on, never restarts
        view = _wait_state(daemon, restore, "COMPLETED", timeout=240)
        assert view["host"] == "h1" and view["exit_code"] == 0
        states = _transitions(view)
        after_loss = states[states.index("UNREACHABLE"):]
        assert after_loss[:2] == ["UNREACHABLE", "CHECKPOINTED"], _events(view)
        moved = [s for s in after_loss if s in ("PLACED", "RESTORING", "RUNNING")]
        assert moved[:3] == ["PLACED", "RESTORING", "RUNNING"], _events(view)
        reason = next(r for s, r in _events(view) if s == "CHECKPOINTED")
        assert "restoring from periodic checkpoint" in reason, reason
        text = daemon.vmjob("logs", restore).stdout
        first, marker, second = text.partition("restored from its checkpoint of")
        assert marker, text
        upto, resumed = _numbers(first, "count"), _numbers(second, "count")
        assert upto == list(range(len(upto))) and len(upto) > 2, first
        # the restored guest continues from where the checkpoint was, not from 0
        assert resumed and resumed[0] == len(upto) and resumed[0] > 0, (upto, resumed)
        assert upto + resumed == list(range(120)), text
        # what the lost run printed after the checkpoint was set aside, not dropped
        lost_files = sorted((daemon.spool / "jobs" / restore).glob("lost.*.out"))
        assert lost_files, "nothing set aside"
        aside = _numbers("".join(p.read_text() for p in lost_files), "count")
        assert aside and aside[0] == len(upto), aside
        assert not list((daemon.spool / "jobs" / restore).glob("*.save"))
    finally:
        devcluster.up(NAME, 3, SUBNET, SPOOL)
