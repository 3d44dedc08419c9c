"""A spool that really fills while a job runs (issue 8, "A full spool loses nothing"), with
real guests, in both modes.

The spool is a tmpfs of SPOOL_SIZE mounted for these tests (unmounted at the end whatever
happens, by `make_daemon`). The guest image (~15 MB) does not have to live in it: like every
test spool, `images/` and `cache/` are symlinks to the shared image root, and libvirt opens the
kernel and initramfs through them; a job's own files (its initrd copy ~1.2 MB, a sparse output
disk, its output and console) and the store are in the small file system. The test fills it
with a file of its own (`fallocate`), leaving a few MB that the job then fills itself, and
removes that file to give the room back.

Run under the guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_full_spool.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import Daemon, our_domains
from tests.daemon.test_nothing_lost import MODES, in_mode, no_domains_left
from vmjobs.guest import SPOOL_FULL_BYTES

SPOOL_SIZE = "40m"
LEFT_FOR_THE_JOB = 4 << 20  # bytes the filler leaves free: the job takes them
STALL_LINE = "output could not be written: the spool's file system is full"
# SQLite appends whole 4 KiB pages (+ a frame header) to the WAL of a fresh store, which
# nothing checkpoints back to its start in a test this short: on a full tmpfs every commit
# needs a page the file system no longer has
STORE_FULL = "database or disk is full"


@pytest.fixture(scope="module")
def full_spool(make_daemon: Any) -> Iterator[Daemon]:
    # unlimited: here it is the spool, not output_limit, that the output runs into
    d = make_daemon("full-spool", spool_size=SPOOL_SIZE, output_limit="unlimited")
    yield d
    d.stop()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(spool: Path, leave: int) -> Path:
    """A file that takes all the spool's room but `leave` bytes."""
    filler = spool / "filler"
    size = free_bytes(spool) - leave
    assert size > 0, free_bytes(spool)
    subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
    return filler


def wait_for(what: str, test: Any, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not test():
        assert time.monotonic() < deadline, f"still not {what} after {timeout_s}s"
        time.sleep(0.2)


def last_job(daemon: Daemon) -> dict[str, Any]:
    rows = daemon.query("SELECT id, state, exit_code, message FROM jobs ORDER BY rowid DESC "
                        "LIMIT 1")
    return dict(rows[0])


def nothing_held_once_room_returns(daemon: Daemon, filler: Path) -> None:
    filler.unlink()
    wait_for("freed", lambda: daemon.reservations() == 0, 60)
    no_domains_left()


@MODES
def test_output_that_fills_the_spool_stops_the_job_failed_and_nothing_stays_held(
        full_spool: Daemon, mode: str, tmp_path: Path) -> None:
    """Before: QEMU, unable to write the output port's file (ENOSPC), retried at once and
    forever at ~100% of a core, the job blocked in its write, holding its cores."""
    in_mode(full_spool, mode)
    filler = fill(full_spool.spool, LEFT_FOR_THE_JOB)
    try:
        # ~21 MB of output into ~4 MB of room
        # into files: a pipe nobody reads while the spool fills would stall the direct run
        with (tmp_path / "out").open("w") as out_file, (tmp_path / "err").open("w") as err_file:
            runner = subprocess.Popen(
                [sys.executable, "-m", "vmjobs", "--config", str(full_spool.config), "run",
                 "--", "sh", "-c", "seq 1 3000000; echo end"],
                stdout=out_file, stderr=err_file, text=True)
        # the job takes the room; then the guest is stopped, not left spinning or paused
        wait_for("full", lambda: free_bytes(full_spool.spool) < SPOOL_FULL_BYTES)
        wait_for("stopped", lambda: not our_domains(), 120)
        if mode == "daemon":
            job = last_job(full_spool)
            # the store cannot take the end either: the job keeps its state and its cores,
            # and a cancel says why in one line, non-zero
            assert job["state"] == "RUNNING", job
            cancel = full_spool.vmjob("cancel", job["id"])
            assert cancel.returncode != 0, cancel.stdout
            assert cancel.stderr.count("\n") == 1 and STORE_FULL in cancel.stderr, cancel.stderr
            assert full_spool.reservations() == 1
            # room again: the daemon records the end it kept, with why the guest was stopped
            nothing_held_once_room_returns(full_spool, filler)
            runner.wait(timeout=120)
            out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
            assert runner.returncode == 125, err
            said = [line for line in err.splitlines() if STALL_LINE in line]
            assert len(said) == 1, err
            job = last_job(full_spool)
            assert (job["state"], job["exit_code"]) == ("FAILED", None), job
            assert job["message"].startswith(STALL_LINE), job
            waited = full_spool.vmjob("wait", job["id"])
            assert waited.returncode == 125 and STALL_LINE in waited.stderr, waited.stderr
        else:
            # the run says why it stopped the guest and that the store could not take the end
            runner.wait(timeout=120)
            out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
            assert runner.returncode == 1, err
            assert "Traceback" not in err, err
            assert len([line for line in err.splitlines() if STALL_LINE in line]) == 1, err
            assert err.splitlines()[-1].startswith("vmjob: job ") and STORE_FULL in err, err
            job = last_job(full_spool)
            assert job["state"] == "RUNNING" and full_spool.reservations() == 1, job
            # room again: the next run reaps the reservation of the run that is gone
            filler.unlink()
            after = full_spool.vmjob("run", "--", "echo", "room")
            assert after.returncode == 0 and after.stdout == "room\n", after.stderr
            assert f"job {job['id']}: its vmjob process had died" in after.stderr
            assert last_job(full_spool)["state"] == "COMPLETED"
            assert full_spool.query("SELECT state FROM jobs WHERE id = ?",
                                    job["id"])[0]["state"] == "LOST"
            assert full_spool.reservations() == 0
        # what was written before the spool filled arrived, in order
        lines = out.split("\n")[:-1]  # the last may be cut where the file system filled
        assert len(lines) > 100_000, len(lines)
        assert lines == [str(i) for i in range(1, len(lines) + 1)], "output out of order"
    finally:
        filler.unlink(missing_ok=True)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    no_domains_left()


RESULT_JOB = "head -c 8000000 /dev/urandom > out/big; echo done"
RESULT_LINE = ("the guest could not write /job/out to its output disk (the job itself exited "
               "with status 0)")


def full_spool_line(text: str) -> str:
    """The one line saying why the job failed. Either the guest's own verdict (its output disk
    reported the write error) or, when the daemon's or the run's one-second look at the output
    came first (the job was quiet while the spool was full), the stall: the two race, and both
    name the cause."""
    said = [line for line in text.splitlines() if RESULT_LINE in line or STALL_LINE in line]
    assert len(said) == 1, text
    return said[0]


@MODES
def test_a_result_that_fills_the_spool_fails_the_job_and_the_guest_never_pauses(
        full_spool: Daemon, mode: str) -> None:
    """The job's /job/out (8 MB, in guest memory) is written to the output disk as it ends,
    into ~4 MB of room: the disk reports the error to the guest (error_policy='report'; QEMU's
    default pauses the guest, holding its cores, with nobody to notice), the init writes an
    `error` header in the block allocated beforehand, and the job ends FAILED saying so.

    Before: the init's writes went through the guest's page cache and the error was lost at
    the final sync: the header said `ok` over a tar with holes, and the daemon failed with
    "output archive could not be extracted: No space left" (with room on the host it would
    have extracted the holes as data)."""
    in_mode(full_spool, mode)
    filler = fill(full_spool.spool, LEFT_FOR_THE_JOB)
    try:
        if mode == "daemon":
            submitted = full_spool.vmjob("submit", "--json", "--", "sh", "-c", RESULT_JOB)
            assert submitted.returncode == 0, submitted.stderr
            job_id = json.loads(submitted.stdout)["id"]
            wait_for("started", lambda: our_domains(), 120)
            # the guest powers itself off (never paused); the end then waits for room
            wait_for("stopped", lambda: not our_domains(), 300)
            assert last_job(full_spool)["state"] == "RUNNING"
            cancel = full_spool.vmjob("cancel", job_id)
            assert cancel.returncode != 0 and STORE_FULL in cancel.stderr, cancel.stderr
            assert full_spool.reservations() == 1
            nothing_held_once_room_returns(full_spool, filler)
            waited = full_spool.vmjob("wait", job_id)
            assert waited.returncode == 125, waited.stderr
            line = full_spool_line(waited.stderr)
            job = last_job(full_spool)
            assert (job["id"], job["state"], job["exit_code"]) == (job_id, "FAILED", None), job
            assert job["message"] in line, (job, line)
        else:
            result = full_spool.vmjob("run", "--", "sh", "-c", RESULT_JOB, timeout=300)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            full_spool_line(result.stderr)
            assert STORE_FULL in result.stderr.splitlines()[-1], result.stderr
            assert result.stdout == "done\n"
            assert not our_domains()  # stopped, not paused
            filler.unlink()
            after = full_spool.vmjob("run", "--", "true")
            assert after.returncode == 0, after.stderr
            assert full_spool.reservations() == 0
    finally:
        filler.unlink(missing_ok=True)
    no_domains_left()
