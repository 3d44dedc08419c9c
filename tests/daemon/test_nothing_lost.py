"""Nothing lost at the edges, with real guests, in both modes: `vmjob run` in its own process
(no daemon answering on the spool) and through the daemon (issue 8, "Nothing lost").

Run under the guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_nothing_lost.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon.conftest import Daemon, our_domains

# ~24 MB: 3000 lines of 1000 '€' (3 bytes each: 64 KiB reads split a character at every
# boundary) then 2,000,000 numbered lines. libvirt's log daemon rotated a serial console at
# 2 MiB and kept 4 files, so any follower of "the console file" lost most of this.
BIG_JOB = ("l=€€€€€€€€€€; l=$l$l$l$l$l$l$l$l$l$l; l=$l$l$l$l$l$l$l$l$l$l; "
           "yes \"$l\" | head -n 3000; seq 1 2000000; echo end")
BIG_OUTPUT = ("€" * 1000 + "\n") * 3000 + "".join(f"{i}\n" for i in range(1, 2000001)) \
    + "end\n"
BIG_TIMEOUT_S = 900  # TCG on a loaded 2-core machine; ~40 s when quiet


@pytest.fixture(scope="module")
def spool_daemon(make_daemon: Any) -> Iterator[Daemon]:
    """A daemon's spool and config, not running: each test starts it for the daemon mode."""
    d = make_daemon("nothing-lost")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def small_disk_daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("small-disk", output_disk_size="4M")
    yield d
    d.stop()


def in_mode(daemon: Daemon, mode: str) -> None:
    """Direct: no daemon answers, so `vmjob run` runs the job in its own process."""
    if mode == "daemon":
        if daemon.proc is None:
            daemon.start()
    else:
        daemon.stop()


def no_domains_left(timeout_s: float = 60) -> None:
    """A daemon records a job's end at the guest's power-off; QEMU is gone a moment later."""
    deadline = time.monotonic() + timeout_s
    while our_domains():
        assert time.monotonic() < deadline, our_domains()
        time.sleep(0.1)


def first_lines(proc: subprocess.Popen[str], count: int, stderr: bool = False) -> str:
    """The first `count` lines of its stdout (or stderr), read from the pipe itself: a text
    readline would buffer more, which communicate() (reading the pipe's fd) then never sees."""
    pipe = proc.stderr if stderr else proc.stdout
    assert pipe is not None
    data = b""
    while data.count(b"\n") < count:
        byte = os.read(pipe.fileno(), 1)
        assert byte, "the stream ended early"
        data += byte
    return data.decode()


MODES = pytest.mark.parametrize("mode", ["direct", "daemon"])


def _first_difference(got: str, want: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
              min(len(got), len(want)))
    return (f"{len(got)} chars instead of {len(want)}; first difference at {at}: "
            f"{got[at - 20:at + 20]!r} vs {want[at - 20:at + 20]!r}")


def test_output_of_any_size_arrives_whole_through_a_direct_run(spool_daemon: Daemon) -> None:
    in_mode(spool_daemon, "direct")
    result = spool_daemon.vmjob("run", "--", "sh", "-c", BIG_JOB, timeout=BIG_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "submitted" not in result.stderr, result.stderr
    assert "\ufffd" not in result.stdout
    assert result.stdout == BIG_OUTPUT, _first_difference(result.stdout, BIG_OUTPUT)
    no_domains_left()


def test_output_of_any_size_arrives_whole_through_run_logs_f_and_logs(
        spool_daemon: Daemon) -> None:
    """One big job through the daemon, read three ways: `vmjob run`'s own stream, a `vmjob
    logs -f` beside it from its start, and `vmjob logs` after its end (one ~24 MB job under
    TCG, not one per way)."""
    in_mode(spool_daemon, "daemon")
    runner = spool_daemon.popen("run", "--", "sh", "-c", BIG_JOB)
    said = ""
    while not (submitted := re.search(r"job (\S+) submitted\n", said)):
        said += first_lines(runner, 1, stderr=True)  # before any of the job's output
    job_id = submitted[1]
    follower = spool_daemon.popen("logs", "-f", job_id)
    followed: list[tuple[str, str]] = []  # read beside the run, so neither stream waits
    reader = threading.Thread(target=lambda: followed.append(
        follower.communicate(timeout=BIG_TIMEOUT_S)), daemon=True)
    reader.start()
    out, err = runner.communicate(timeout=BIG_TIMEOUT_S)
    assert runner.returncode == 0, said + err
    assert "\ufffd" not in out
    assert out == BIG_OUTPUT, _first_difference(out, BIG_OUTPUT)
    waited = spool_daemon.vmjob("wait", job_id, timeout=BIG_TIMEOUT_S)
    assert waited.returncode == 0, waited.stderr
    reader.join(timeout=120)
    if not followed:
        follower.kill()
        raise AssertionError("logs -f did not end within 120 s of the job's end")
    (follow_out, follow_err), = followed
    assert follower.returncode == 0, follow_err
    assert follow_out == BIG_OUTPUT, _first_difference(follow_out, BIG_OUTPUT)
    logs = spool_daemon.vmjob("logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == BIG_OUTPUT, _first_difference(logs.stdout, BIG_OUTPUT)
    no_domains_left()


@MODES
def test_an_output_larger_than_the_disk_fails_the_job_saying_how_much(
        small_disk_daemon: Daemon, mode: str) -> None:
    in_mode(small_disk_daemon, mode)
    result = small_disk_daemon.vmjob(
        "run", "--", "sh", "-c", "head -c 6000000 /dev/urandom > out/big; echo wrote; exit 0")
    assert result.returncode == 125, result.stderr
    assert result.stdout == "wrote\n"
    said = [line for line in result.stderr.splitlines() if "output refused" in line]
    assert len(said) == 1, result.stderr
    # the tar of 6,000,000 bytes (+ headers) against 4 MiB less the 512-byte header
    assert re.search(r"/job/out needs 60\d{5} bytes as a tar and the output disk holds "
                     rf"{4 * 2**20 - 512}\b", said[0]), said[0]
    assert "exited with status 0" in said[0]
    rows = small_disk_daemon.query("SELECT state, exit_code FROM jobs ORDER BY rowid DESC "
                                   "LIMIT 1")
    assert (rows[0]["state"], rows[0]["exit_code"]) == ("FAILED", None)
    no_domains_left()
    deadline = time.monotonic() + 30
    while small_disk_daemon.reservations():  # freed once libvirt reports the guest stopped
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_clients_reconnect_after_a_daemon_restart_and_return_the_exit_code(
        spool_daemon: Daemon) -> None:
    in_mode(spool_daemon, "daemon")
    script = "for i in $(seq 1 12); do echo line $i; sleep 1; done; exit 3"
    expected = "".join(f"line {i}\n" for i in range(1, 13))
    runner = spool_daemon.popen("run", "--", "sh", "-c", script)
    submitted = spool_daemon.vmjob("submit", "--json", "--", "sh", "-c", script)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    follower = spool_daemon.popen("logs", "-f", job_id)
    waiter = spool_daemon.popen("wait", job_id)
    assert follower.stdout is not None and runner.stdout is not None
    # both jobs run and both streams flow before the daemon dies
    seen = first_lines(follower, 2)
    ran = first_lines(runner, 1)
    assert (seen, ran) == ("line 1\nline 2\n", "line 1\n")
    spool_daemon.kill9()
    spool_daemon.start()

    rest, follow_err = follower.communicate(timeout=180)
    assert follower.returncode == 0, follow_err
    assert seen + rest == expected  # nothing twice, nothing missing
    assert "reconnecting" in follow_err and "Traceback" not in follow_err, follow_err
    _out, wait_err = waiter.communicate(timeout=180)
    assert waiter.returncode == 3, wait_err
    assert "reconnecting" in wait_err and "Traceback" not in wait_err, wait_err
    run_rest, run_err = runner.communicate(timeout=180)
    assert runner.returncode == 3, run_err
    assert ran + run_rest == expected
    assert "reconnecting" in run_err and "Traceback" not in run_err, run_err
    no_domains_left()


@pytest.fixture(scope="module")
def capped_daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("capped", output_limit="1M")
    yield d
    d.stop()


# ~3.4 MB of numbered lines, then a last line the cap never lets through
OVER_CAP_JOB = "seq 1 500000; echo end"
OVER_CAP_OUTPUT = "".join(f"{i}\n" for i in range(1, 500001)) + "end\n"
CAP_LINE = "output exceeded output_limit 1 MiB; guest stopped"


def reservations_freed(daemon: Daemon, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while daemon.reservations():  # freed once libvirt reports the guest stopped
        assert time.monotonic() < deadline, daemon.query("SELECT * FROM cpu_reservations")
        time.sleep(0.1)


@MODES
def test_output_past_output_limit_stops_the_job_failed_saying_so(
        capped_daemon: Daemon, mode: str) -> None:
    in_mode(capped_daemon, mode)
    result = capped_daemon.vmjob("run", "--", "sh", "-c", OVER_CAP_JOB, timeout=BIG_TIMEOUT_S)
    assert result.returncode == 125, result.stderr
    said = [line for line in result.stderr.splitlines() if CAP_LINE in line]
    assert len(said) == 1, result.stderr
    # what the job wrote before it was stopped arrives (at least the cap; at most what it
    # wrote in the second until the next look), never a silent cut
    got = result.stdout
    assert 1 << 20 < len(got) < len(OVER_CAP_OUTPUT), len(got)
    assert got == OVER_CAP_OUTPUT[:len(got)], _first_difference(got, OVER_CAP_OUTPUT)
    rows = capped_daemon.query("SELECT id, state, exit_code, message FROM jobs "
                               "ORDER BY rowid DESC LIMIT 1")
    assert (rows[0]["state"], rows[0]["exit_code"], rows[0]["message"]) == \
        ("FAILED", None, CAP_LINE)
    if mode == "daemon":  # `vmjob wait` says the same
        waited = capped_daemon.vmjob("wait", rows[0]["id"])
        assert waited.returncode == 125 and CAP_LINE in waited.stderr, waited.stderr
    no_domains_left()
    reservations_freed(capped_daemon)


@MODES
def test_output_under_output_limit_is_untouched(capped_daemon: Daemon, mode: str) -> None:
    in_mode(capped_daemon, mode)
    # ~590 KB, written in several seconds under TCG: the watch looks at it more than once
    result = capped_daemon.vmjob("run", "--", "sh", "-c", "seq 1 100000; exit 7",
                                 timeout=BIG_TIMEOUT_S)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 100001))
    assert "output_limit" not in result.stderr
    no_domains_left()
    reservations_freed(capped_daemon)
