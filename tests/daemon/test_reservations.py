"""Held reservations with keys (issue 11 part 2), through a real daemon and real guests.

The local host has room for 2 one-vCPU guests (`conftest.ROOM_CPUS`); a reservation of both
cores leaves nothing outside it. Every test ends with no reservation row left and no guest
(`virsh list`), whatever ended the reservation.
"""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon.conftest import Daemon, dump, our_domains
from vmjobs.jobs import JobState

KEY = "ci-step-7f3a"
BAD_KEY_EXIT = 77
SETTLE_S = 60.0  # generous bounds: a loaded 2-core machine
UNENDED = tuple(s.value for s in JobState if not s.finished)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of `proc`'s stdout, waiting on the pipe (not a sleep)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise AssertionError(f"no line within {timeout}s; stderr: {proc.stderr.read()}")
    line = proc.stdout.readline().strip()
    assert line, f"no line: exit {proc.wait(timeout=30)}, stderr: {proc.stderr.read()}"
    return line


def reservation_rows(daemon: Daemon) -> list[dict[str, Any]]:
    return [dict(r) for r in daemon.query(
        "SELECT c.cpu, c.job_id, c.user_id FROM cpu_reservations c JOIN jobs j"
        " ON j.id = c.job_id WHERE j.kind = 'reservation' ORDER BY c.cpu")]


def until(check: Any, timeout: float, what: str) -> None:
    """Wait for `check()` to hold: the store is read until it does (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def nothing_left(daemon: Daemon) -> None:
    until(lambda: daemon.reservations() == 0, SETTLE_S, "every reservation row freed")
    assert not [d for d in our_domains()
                if d.removeprefix("vmjob-") in {r["id"] for r in daemon.query(
                    "SELECT id FROM jobs")}]


@pytest.fixture(scope="module")
def served(make_daemon: Any) -> Iterator[Daemon]:
    """One daemon for the module: each test makes its own reservations and jobs, ends them
    and checks that nothing is left (`nothing_left`), so the next starts from an idle one."""
    d = make_daemon("holds")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def daemon(served: Daemon) -> Iterator[Daemon]:
    """The module's daemon. After a test that failed with a reservation or a job still
    going, those are ended (and waited for), so the failure stays with that test."""
    assert served.proc is not None and served.proc.poll() is None, served.log_text()
    yield served
    left = [r for r in served.query("SELECT id, kind, state FROM jobs")
            if r["state"] in UNENDED]
    for row in left:
        if row["kind"] == "reservation":
            served.vmjob("release", "--force", row["id"])
        else:
            served.vmjob("cancel", row["id"])
    if left:
        nothing_left(served)


def reserve(daemon: Daemon, *args: str) -> str:
    done = daemon.vmjob("reserve", *args, timeout=120)
    assert done.returncode == 0, done.stderr + daemon.log_text()
    reservation_id = done.stdout.strip()
    assert reservation_id.startswith("r")
    return reservation_id


def test_a_keyed_reservation_runs_jobs_inside_one_after_another_and_side_by_side(
        daemon: Daemon) -> None:
    rid = reserve(daemon, "--cpus", "2", "--mem", "640M", "--key", KEY, "--duration", "10m")
    held = reservation_rows(daemon)
    assert [r["job_id"] for r in held] == [rid, rid] and all(r["user_id"] is None for r in held)

    # nothing outside it: the reservation holds both cores of the room
    outside = daemon.vmjob("submit", "--no-wait", "--", "true")
    assert outside.returncode == 75, outside.stderr
    another = daemon.vmjob("reserve", "--no-wait", "--cpus", "1", "--duration", "1m")
    assert another.returncode == 75, another.stderr

    # refusals, each one line, nothing created
    jobs_before = len(daemon.query("SELECT id FROM jobs"))
    for key_args in (["--key", "wrong"], []):
        refused = daemon.vmjob("run", "--reservation", rid, *key_args, "--", "true")
        assert refused.returncode == BAD_KEY_EXIT, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "key" in refused.stderr and KEY not in refused.stderr
    as_json = daemon.vmjob("submit", "--json", "--reservation", rid, "--key", "nope", "--",
                           "true")
    assert as_json.returncode == BAD_KEY_EXIT
    assert json.loads(as_json.stdout)["code"] == "bad_key"
    too_big = daemon.vmjob("run", "--reservation", rid, "--key", KEY, "--cpus", "3", "--",
                           "true")
    assert too_big.returncode == 1, too_big.stderr
    assert f"does not fit inside reservation {rid}" in too_big.stderr
    assert len(too_big.stderr.strip().splitlines()) == 1
    assert len(daemon.query("SELECT id FROM jobs")) == jobs_before

    # two side by side (each 1 vCPU), then one after them that needs both cores
    script = "grep Cpus_allowed_list /proc/self/status; sleep 2"
    first, second = (daemon.vmjob("submit", "--reservation", rid, "--key", KEY, "--", "sh",
                                  "-c", script).stdout.strip() for _ in range(2))
    after = daemon.vmjob("submit", "--reservation", rid, "--key", KEY, "--cpus", "2",
                         "--mem", "300M", "--", "nproc").stdout.strip()
    assert first and second and after
    views = daemon.wait_all_ended([first, second, after], timeout=180)
    assert [views[j]["state"] for j in (first, second, after)] == ["COMPLETED"] * 3, \
        dump(views)
    reserved = {r["cpu"] for r in held}
    shown = [daemon.client().job(j) for j in (first, second, after)]
    placed = [s["events"][1]["reason"] for s in shown]
    assert all(f"inside reservation {rid}" in p for p in placed), placed
    # a job inside holds nothing of its own (usage counts the reservation's hold once)
    assert daemon.query("SELECT held FROM events WHERE job_id = ? AND state = 'RUNNING'",
                        first)[0]["held"] is None
    starts = {s["id"]: [e["time"] for e in s["events"] if e["state"] == "RUNNING"][0]
              for s in shown}
    ends = {s["id"]: s["updated"] for s in shown}
    # side by side: the second started before the first ended; the third after both
    assert starts[second] < ends[first] and starts[first] < ends[second]
    assert starts[after] >= max(ends[first], ends[second]) - 0.5
    inside = daemon.client().job(rid)
    assert inside["kind"] == "reservation" and inside["state"] == "HELD"
    assert {j["id"] for j in inside["jobs"]} == {first, second, after}
    # the jobs ran on the reservation's cores only
    for job_id in (first, second):
        logs = "".join(daemon.client().logs(job_id))
        assert "Cpus_allowed_list" in logs
    for view in (views[first], views[second]):
        alloc = daemon.query("SELECT allocation FROM jobs WHERE id = ?", view["id"])
        assert alloc[0]["allocation"] is None  # released back to the reservation
    assert {c for s in shown[:2] for c in _cpus(s)} <= reserved

    # release: a wrong key is refused with the distinct code; the right one frees it all
    wrong = daemon.vmjob("release", rid, "--key", "wrong")
    assert wrong.returncode == BAD_KEY_EXIT, wrong.stderr
    assert reservation_rows(daemon)
    released = daemon.vmjob("release", rid, "--key", KEY)
    assert released.returncode == 0, released.stderr
    assert daemon.client().job(rid)["state"] == "RELEASED"
    nothing_left(daemon)


def _cpus(view: dict[str, Any]) -> list[int]:
    """The cpus a job was placed on, from its PLACED event's description."""
    reason = next(e["reason"] for e in view["events"] if e["state"] == "PLACED")
    text = reason.split("cpus ", 1)[1].split(" ", 1)[0]
    return [int(c) for c in text.split(",")]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "enter"])
def test_an_interactive_reservation_leaves_nothing_held(daemon: Daemon, how: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmjobs", "--config", str(daemon.config), "reserve", "--cpus",
         "1", "--interactive"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        rid = read_line(proc, 60)
        assert [r["job_id"] for r in reservation_rows(daemon)] == [rid]
        assert daemon.client().job(rid)["state"] == "HELD"
        if how == "enter":
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            expected = 0
        else:
            proc.send_signal(getattr(signal, how))
            expected = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[how]
        assert proc.wait(timeout=60) == expected, proc.stderr.read() if proc.stderr else ""
        nothing_left(daemon)
        final = daemon.client().job(rid)
        assert final["state"] == "RELEASED", dump(final)
        if how == "SIGKILL":
            assert final["message"] == "its client's connection closed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_expiry_stops_the_jobs_inside_with_a_line_saying_why(daemon: Daemon) -> None:
    rid = reserve(daemon, "--cpus", "1", "--duration", "20s")
    run = daemon.popen("run", "--reservation", rid, "--", "sh", "-c",
                       "echo started; sleep 300")
    try:
        assert read_line(run, 60) == "started"
        code = run.wait(timeout=120)
        stderr = run.stderr.read() if run.stderr else ""
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert code == 124, stderr
    assert f"reservation {rid} ended (its --duration of 20s is over)" in stderr, stderr
    job_id = daemon.query("SELECT id FROM jobs WHERE inside = ?", rid)[0]["id"]
    view = daemon.client().job(job_id)
    assert view["state"] == "TIMEOUT"
    assert any(f"reservation {rid} ended" in (e["reason"] or "") for e in view["events"])
    assert daemon.client().job(rid)["state"] == "TIMEOUT"
    nothing_left(daemon)


def test_kill_9_of_a_tied_reservation_stops_the_job_inside_first(daemon: Daemon) -> None:
    hold = subprocess.Popen(
        [sys.executable, "-m", "vmjobs", "--config", str(daemon.config), "reserve", "--cpus",
         "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = None
    try:
        rid = read_line(hold, 60)
        run = daemon.popen("run", "--reservation", rid, "--", "sh", "-c",
                           "echo started; sleep 300")
        assert read_line(run, 60) == "started"
        hold.send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
        stderr = run.stderr.read() if run.stderr else ""
        assert code == 130, stderr
        assert f"reservation {rid} ended (its client's connection closed)" in stderr, stderr
        assert daemon.client().job(rid)["state"] == "RELEASED"
        nothing_left(daemon)
    finally:
        for proc in (hold, run):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
