"""One lifecycle: every case gives the same stderr line and exit code whether `vmjob run` runs
the job directly (no daemon answers at its socket: the daemon's core runs in the `vmjob run`
process, scoped to its job) or through a daemon — real guests, one spool and store for both
(issue 8, "One lifecycle").

The direct mode's config names a socket where nobody listens, while the daemon serves the
same spool at its own: so every direct case also checks that the daemon leaves a direct
run's job alone. Run under the guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_both_modes.py
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.daemon.conftest import Daemon, our_domains

MODES = ("direct", "daemon")
# 1,100,000 bytes of '€' (3 bytes each; 64 KiB reads split one at nearly every boundary)
# in 1,100 lines, then the job exits 3
EURO_LINE = "€" * 333 + "\n"  # 1000 bytes
BIG = "l=" + "€" * 9 + "; l=" + "$l" * 37 + '; yes "$l" | head -n 1100; exit 3'


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    stdout: str | None  # None: not compared
    end: str | None  # the last stderr line (a pattern), the job's id as JOB; None: none


CASES = {
    "bad spec": Case(("--mem", "1024", "--", "true"), 2, "",
                     re.escape("vmjob: --mem 1024 bytes is too small to boot a guest (at least "
                               "128M); did you mean 1024M?")),
    "1 MB of split UTF-8 and exit 3": Case(("--", "sh", "-c", BIG), 3, EURO_LINE * 1100, None),
    # the limit counts from the guest's start, before the job's first line when the machine
    # is loaded: its output is not compared
    "time limit": Case(("--timeout", "5s", "--", "sh", "-c", "echo ready; sleep 120"), 124,
                       None, re.escape("vmjob: job JOB TIMEOUT: time limit of 5s reached; "
                                       "guest stopped")),
    "output larger than its disk": Case(
        ("--", "sh", "-c", "head -c 6000000 /dev/urandom > out/big; echo wrote"), 125,
        "wrote\n",
        # the tar of 6,000,000 bytes + its headers against 4 MiB less the 512-byte header
        re.escape("vmjob: job JOB FAILED: output refused: /job/out needs ") + r"60\d{5}"
        + re.escape(f" bytes as a tar and the output disk holds {4 * 2**20 - 512}; raise "
                    "output_disk_size (the job itself exited with status 0)")),
}


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("both-modes", output_disk_size="4M")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def commands(daemon: Daemon) -> dict[str, list[str]]:
    """`vmjob run` in each mode: the daemon's config, or the same with a socket where nobody
    listens (so run goes direct, on the same spool and store)."""
    direct = daemon.spool / "direct.yaml"
    data = yaml.safe_load(daemon.config.read_text())
    direct.write_text(yaml.safe_dump({**data, "socket": str(daemon.spool / "nobody.sock")}))
    vmjob = [sys.executable, "-m", "vmjobs", "--config"]
    return {"direct": [*vmjob, str(direct), "run"], "daemon": [*vmjob, str(daemon.config), "run"]}


def with_job_as_placeholder(stderr: str) -> tuple[str | None, str]:
    """The job's id (from the first line: 'job X on HOST: ...' or 'job X submitted') and the
    last line with that id replaced by JOB."""
    lines = stderr.splitlines()
    first = re.match(r"vmjob: job (\S+) ", lines[0]) if lines else None
    job_id = first.group(1) if first else None
    last = lines[-1] if lines else ""
    return job_id, last.replace(f"job {job_id} ", "job JOB ") if job_id else last


def nothing_held(daemon: Daemon, job_id: str | None) -> None:
    """No guest and no reservation of the job. A daemon's client hears the end at the guest's
    power-off and QEMU is gone a moment later: waited for, with a generous bound."""
    deadline = time.monotonic() + 60
    while True:
        held = daemon.query("SELECT COUNT(*) FROM cpu_reservations WHERE job_id = ?",
                            job_id or "")[0][0]
        if not held and f"vmjob-{job_id}" not in our_domains():
            return
        assert time.monotonic() < deadline, (held, our_domains())
        time.sleep(0.1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_same_line_and_exit_code_in_both_modes(daemon: Daemon, commands: dict[str, list[str]],
                                               name: str, mode: str) -> None:
    case = CASES[name]
    result = subprocess.run([*commands[mode], *case.args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == case.code, result.stderr
    if case.stdout is not None:
        assert result.stdout == case.stdout, (len(result.stdout), result.stdout[:200])
    assert "Traceback" not in result.stderr
    job_id, last = with_job_as_placeholder(result.stderr)
    if case.end is None:
        assert len(result.stderr.splitlines()) == 1, result.stderr  # only the job's first line
    else:
        assert re.fullmatch(case.end, last), result.stderr
    if case.code == 2:
        assert len(result.stderr.splitlines()) == 1 and job_id is None, result.stderr
        return
    assert job_id is not None, result.stderr
    nothing_held(daemon, job_id)
    [row] = daemon.query("SELECT spec FROM jobs WHERE id = ?", job_id)
    assert ('"runner"' in row["spec"]) == (mode == "direct")  # the mode it claims to test


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_cancels_with_130_and_leaves_nothing_held(daemon: Daemon,
                                                          commands: dict[str, list[str]],
                                                          mode: str) -> None:
    proc = subprocess.Popen([*commands[mode], "--", "sh", "-c", "echo ready; sleep 120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    # meanwhile a direct run finds no room for 2 cpus: it does not wait, leaves nothing
    jobs_before = daemon.query("SELECT COUNT(*) FROM jobs")[0][0]
    dirs_before = set((daemon.spool / "jobs").iterdir())
    busy = subprocess.run([*commands["direct"], "--cpus", "2", "--", "true"],
                          capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1, busy.stderr
    assert len(busy.stderr.splitlines()) == 1, busy.stderr
    assert busy.stderr.startswith("vmjob: cannot start now: ") and \
        busy.stderr.rstrip().endswith("(without a daemon, vmjob run does not wait)"), busy.stderr
    assert daemon.query("SELECT COUNT(*) FROM jobs")[0][0] == jobs_before
    assert set((daemon.spool / "jobs").iterdir()) == dirs_before
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    job_id, last = with_job_as_placeholder(err)
    assert last == "vmjob: job JOB cancelled (SIGINT); guest destroyed, reservation released", err
    assert job_id is not None
    # held nothing the moment it exited, in both modes
    assert daemon.query("SELECT COUNT(*) FROM cpu_reservations WHERE job_id = ?",
                        job_id)[0][0] == 0
    assert f"vmjob-{job_id}" not in our_domains()
    [row] = daemon.query("SELECT state FROM jobs WHERE id = ?", job_id)
    assert row["state"] == "CANCELLED"

