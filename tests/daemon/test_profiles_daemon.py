"""Profiles and the waiting `vmjob run` through a real daemon.

- `vmjob run` through the daemon says where its job waits and why (issue 11 part 6): the
  host is libvirt's test driver (test:///default, 16 cpus; a job's domain "runs" there until
  cancelled, without a hypervisor), so no guest boots for it;
- a profile applies, and options given with it win, in real guests (TCG) — the direct run
  and the daemon alike — checked by the guest's own nproc and MemTotal. Run under the guest
  lock, with a spool of your own:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_profiles_daemon.py
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from typing import Any

from tests.daemon.conftest import host_entry

LINE_BOUND_S = 120.0  # generous: the run's lines come within seconds on a quiet machine


class Lines:
    """A process's stderr lines, read by a thread, waited on one by one with a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stderr is not None
        stream = proc.stderr
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, text: str, bound: float = LINE_BOUND_S) -> str:
        deadline = time.monotonic() + bound
        while True:
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"stderr ended without {text!r}: {self.seen}"
            self.seen.append(line)
            if text in line:
                return line


def _state(client: Any, job_id: str, wanted: str, daemon: Any) -> None:
    deadline = time.monotonic() + LINE_BOUND_S
    while client.job(job_id)["state"] != wanted:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)


def test_a_waiting_run_says_where_and_why_and_a_prompt_one_says_nothing(
        make_daemon: Any) -> None:
    daemon = make_daemon("runwaits", hosts=[{"name": "t", "uri": "test:///default"}],
                         profiles={"half": {"cpus": 8, "numa": "strict"}})
    daemon.start()
    client = daemon.client()
    try:
        # room at once: the run's job starts; no waiting line
        prompt = daemon.popen("run", "--", "true")
        lines = Lines(prompt)
        job = lines.until("submitted").split()[2]
        _state(client, job, "RUNNING", daemon)
        prompt.send_signal(signal.SIGINT)
        assert prompt.wait(timeout=LINE_BOUND_S) == 130
        assert not any("queued at" in line for line in lines.seen), lines.seen
        # a job filling the host: the next run waits, and says so
        filler = client.submit({"argv": ["true"], "cpus": 16})["id"]
        _state(client, filler, "RUNNING", daemon)
        waiting = daemon.popen("run", "--cpus", "2", "--", "true")
        lines = Lines(waiting)
        job = lines.until("submitted").split()[2]
        line = lines.until("queued at position")
        assert line.startswith(f"vmjob: job {job} queued at position 1"), line
        assert "t: 0 free cores, needs 2" in line  # the reason names what is missing
        # the daemon's profiles over --url: none of "half" fits now; a submit through the URL
        # gets the profile's fields and keeps its name
        url = f"unix://{daemon.socket}"
        listed = daemon.vmjob("profiles", "--url", url, "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == [{"name": "half", "cpus": 8, "numa": "strict",
                                              "hosts": {"t": 0}}]
        # without --url, the daemon on the config's socket answers the same
        assert json.loads(daemon.vmjob("profiles", "--json").stdout) == json.loads(listed.stdout)
        half = daemon.vmjob("submit", "--url", url, "--profile", "half", "--", "true")
        assert half.returncode == 0, half.stderr
        view = client.job(half.stdout.strip())
        assert (view["request"]["cpus"], view["profile"]) == (8, "half")
        client.cancel(view["id"])
        # the filler goes: the waiting job starts, and says where
        client.cancel(filler)
        assert lines.until("starts on") == f"vmjob: job {job} starts on t"
        _state(client, job, "RUNNING", daemon)
        # test:///default: node0 and node1 of 8 cpus; the job's 2 cpus leave one whole node
        counts = json.loads(daemon.vmjob("profiles", "--url", url, "--json").stdout)
        assert counts[0]["hosts"] == {"t": 1}
        # usage by pool and by profile through the daemon (GET /v1/usage)
        pools = json.loads(daemon.vmjob("usage", "--by", "pool", "--json").stdout)["rows"]
        assert [(r["pool"], r["hosts"], r["usable_cores"], r["held_now"]) for r in pools] == \
            [("default", ["t"], 16, 2)]
        (half,) = json.loads(daemon.vmjob("usage", "--by", "profile", "--json").stdout)["rows"]
        assert (half["profile"], half["usable_cores"], half["jobs"]) == ("half", 16, 0)
        assert all(0.0 <= v <= 1.0 for v in half["could_start"].values()), half
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=LINE_BOUND_S) == 130
    finally:
        client.close()


PROFILES = {"two": {"cpus": 2, "mem": "384M"}}
SHOW = ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]


def _guest_sees(done: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """(nproc, MemTotal in MiB) as the guest printed them."""
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    return int(lines[0]), int(lines[1].split()[1]) // 1024


def test_a_profile_applies_and_options_win_in_real_guests(make_daemon: Any) -> None:
    daemon = make_daemon("profiles", hosts=[host_entry()], profiles=PROFILES)
    # no daemon running: a direct run, the profile from the config
    cpus, mem = _guest_sees(daemon.vmjob("run", "--profile", "two", "--", *SHOW))
    assert cpus == 2 and 330 <= mem <= 384  # the kernel keeps some memory out of MemTotal
    # through the daemon: an option given with the profile wins, the rest stays
    daemon.start()
    cpus, mem = _guest_sees(daemon.vmjob("run", "--profile", "two", "--cpus", "1", "--",
                                         *SHOW))
    assert cpus == 1 and 330 <= mem <= 384
    # both jobs (the direct run's too: one store) keep the profile's name
    listed = json.loads(daemon.vmjob("list", "--all", "--json").stdout)
    assert sorted(j["request"]["cpus"] for j in listed) == [1, 2]
    for job in listed:
        shown = json.loads(daemon.vmjob("show", job["id"], "--json").stdout)
        assert shown["profile"] == "two"
    refused = daemon.vmjob("run", "--profile", "nope", "--", "true")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "unknown profile 'nope'" in refused.stderr
    # the guests' cores are freed once libvirt has seen their domains go (a second or two)
    deadline = time.monotonic() + LINE_BOUND_S
    while daemon.reservations():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.2)
