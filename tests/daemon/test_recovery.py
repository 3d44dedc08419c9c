"""The daemon killed with SIGKILL and restarted; a compute host that dies under its jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.daemon import farhost
from tests.daemon.conftest import Daemon, dump, host_entry, our_domains


def wait_for(predicate: Any, timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s:\n{daemon.log_text()}"
        time.sleep(0.1)


def states(daemon: Daemon, ids: list[str]) -> dict[str, str]:
    rows = daemon.query("SELECT id, state FROM jobs")
    return {r["id"]: r["state"] for r in rows if r["id"] in ids}


def test_kill9_with_two_running_and_three_queued_then_restart(make_daemon: Any) -> None:
    daemon = make_daemon("recover")
    daemon.start()
    client = daemon.client()
    # job 0 ends while the daemon is dead, job 1 still runs at the restart, 2-4 are queued
    scripts = ["echo early > out/r; exit 0", "sleep 12; echo late > out/r; exit 1"] + [
        f"echo queued{i} > out/r; exit {i}" for i in range(2, 5)]
    ids = [client.submit({"argv": ["sh", "-c", s]})["id"] for s in scripts]
    client.close()
    wait_for(lambda: list(states(daemon, ids).values()).count("RUNNING") == 2, 60,
             "two jobs running", daemon)
    assert [states(daemon, ids)[j] for j in ids[2:]] == ["QUEUED"] * 3

    daemon.kill9()
    assert daemon.socket.exists()  # left behind by the dead daemon; the next one claims it
    # job 0's guest powers off while nobody watches
    wait_for(lambda: f"vmjob-{ids[0]}" not in our_domains(), 60, "job 0's guest ending", daemon)
    assert f"vmjob-{ids[1]}" in our_domains()
    assert states(daemon, ids)[ids[0]] == "RUNNING"  # the store does not know yet

    daemon.start()
    views = daemon.wait_all_ended(ids, timeout=180)
    assert [views[j]["state"] for j in ids] == ["COMPLETED", "FAILED", "FAILED", "FAILED",
                                                "FAILED"], dump(views)
    assert [views[j]["exit_code"] for j in ids] == [0, 1, 2, 3, 4]
    outputs = [(daemon.spool / "jobs" / j / "out" / "r").read_text() for j in ids]
    assert outputs == ["early\n", "late\n", "queued2\n", "queued3\n", "queued4\n"]
    client = daemon.client()
    reasons = [e["reason"] for e in client.job(ids[1])["events"]]
    assert "found running at recovery" in reasons
    client.close()
    # the cores are freed once libvirt has stopped each guest, ~1 s after the recorded end
    wait_for(lambda: daemon.reservations() == 0, 15, "reservations freed", daemon)
    assert not set(our_domains()) & {f"vmjob-{j}" for j in ids}
    # each job ran exactly once: one RUNNING start recorded by a launch, never two guests
    for job_id in ids:
        starts = daemon.query("SELECT COUNT(*) FROM events WHERE job_id = ? AND state = "
                              "'STARTING'", job_id)[0][0]
        assert starts == 1, job_id
    daemon.stop()


@pytest.fixture
def far(image_root: Path) -> Any:
    proc = farhost.start(image_root / "far")
    yield proc
    farhost.kill(proc)


def test_a_stopped_host_is_unreachable_then_its_jobs_lost(make_daemon: Any, far: Any,
                                                         image_root: Path) -> None:
    far_uri = farhost.uri(image_root / "far")
    daemon = make_daemon("lost", hosts=[host_entry(), host_entry("far", far_uri)],
                         host_down_after="4s")
    daemon.start()
    client = daemon.client()
    assert client.status()["hosts"] == {"local": True, "far": True}
    job_id = client.submit({"argv": ["sh", "-c", "echo up; sleep 120"], "host": "far"})["id"]
    wait_for(lambda: states(daemon, [job_id])[job_id] == "RUNNING", 60, "running on far",
             daemon)
    conn = libvirt.open(far_uri)
    assert [d.name() for d in conn.listAllDomains()] == [f"vmjob-{job_id}"]
    conn.close()

    farhost.kill(far)  # libvirtd and the guest die together
    gone = time.time()
    view = client.call("GET", f"/v1/jobs/{job_id}/wait?timeout=60", timeout=70)
    assert view["state"] == "LOST", dump(view)
    assert view["message"].startswith("host far lost: "), view["message"]
    # not responding first (its reservation kept), declared lost after host_down_after
    events = [(e["state"], e["time"]) for e in client.job(job_id)["events"]]
    states_seen = [state for state, _ in events]
    assert states_seen[-2:] == ["UNREACHABLE", "LOST"], events
    unreachable_at, lost_at = events[-2][1], events[-1][1]
    assert unreachable_at - gone < 10 and 3.5 < lost_at - unreachable_at < 30, events
    assert daemon.reservations() == 0
    status = client.status()
    assert status["hosts"] == {"local": True, "far": False}
    hosts = {h["name"]: h for h in client.hosts()}
    assert hosts["far"]["state"] != "up" and hosts["local"]["state"] == "up"
    # a job for the lost host waits (the engine says why); the daemon serves on
    waiting = client.submit({"argv": ["true"], "host": "far"})
    assert waiting["state"] == "QUEUED"
    listed = {v["id"]: v for v in client.jobs()}
    assert "far" in (listed[waiting["id"]]["waiting_because"] or ""), dump(listed)
    assert client.cancel(waiting["id"])["state"] == "CANCELLED"
    client.close()
    daemon.stop()


LINES = 90  # 45 s of output: outlives every disturbance below


@pytest.mark.parametrize("how", ["term", "kill", "stop"])
def test_a_libvirtd_restart_or_stall_is_not_a_lost_job(make_daemon: Any, far: Any,
                                                      image_root: Path, how: str) -> None:
    """libvirt keeps guests running across a restart of libvirtd (graceful or kill -9) and a
    stall: the job is UNREACHABLE meanwhile, taken back when libvirtd answers again (within
    seconds), and ends with its exit code and every line; its guest is never destroyed and
    never doubled."""
    far_dir = image_root / "far"
    daemon = make_daemon(f"lvd-{how}", hosts=[host_entry(), host_entry("far",
                                                                        farhost.uri(far_dir))])
    daemon.start()
    client = daemon.client()
    script = (f"i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.5; done; "
              "exit 7")
    job_id = client.submit({"argv": ["sh", "-c", script], "host": "far"})["id"]
    wait_for(lambda: "line 3" in daemon.vmjob("logs", job_id).stdout, 90, "the job printing",
             daemon)

    back = farhost.disturb_libvirtd(far, far_dir, how)
    wait_for(lambda: states(daemon, [job_id])[job_id] == "RUNNING"
             and "UNREACHABLE" in [e["state"] for e in client.job(job_id)["events"]],
             60, "the job taken back", daemon)
    events = client.job(job_id)["events"]
    retaken = [e for e in events if e["state"] == "RUNNING"][-1]
    assert retaken["reason"] == "host far back: guest still running", events
    assert retaken["time"] - back < 15, events  # reconnected promptly

    view = client.call("GET", f"/v1/jobs/{job_id}/wait?timeout=120", timeout=130)
    assert (view["state"], view["exit_code"]) == ("FAILED", 7), dump(view)
    logs = daemon.vmjob("logs", job_id)
    assert [ln for ln in logs.stdout.splitlines() if ln.startswith("line ")] == [
        f"line {i}" for i in range(LINES)], logs.stdout[-2000:] + logs.stderr
    starts = daemon.query("SELECT COUNT(*) FROM events WHERE job_id = ? AND state = "
                          "'STARTING'", job_id)[0][0]
    assert starts == 1
    wait_for(lambda: daemon.reservations() == 0, 20, "reservations freed", daemon)
    conn = libvirt.open(farhost.uri(far_dir))
    assert [d.name() for d in conn.listAllDomains()] == []
    conn.close()
    client.close()
    daemon.stop()
