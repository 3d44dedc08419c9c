"""The daemon with `start: warm`: its launch restores the job's guest from a template
(vmjobs/template.py) and the job's output and exit code come back as from a cold start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon.conftest import Daemon, our_domains


@pytest.fixture(scope="module")
def warm_daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("warm", start="warm")
    d.start()
    yield d
    d.stop()


def test_a_daemon_job_starts_warm_with_its_output_and_exit_code(warm_daemon: Daemon) -> None:
    result = warm_daemon.vmjob("submit", "--mem", "256M", "--", "sh", "-c",
                               "echo warm-hi; exit 4")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    view = warm_daemon.wait_all_ended([job_id], timeout=240)[job_id]
    assert view["state"] == "FAILED", view
    assert view["exit_code"] == 4, view
    started = [r["reason"] for r in warm_daemon.query(
        "SELECT reason FROM events WHERE job_id = ? AND state = 'RUNNING'", job_id)]
    assert started == ["guest started (qemu, warm)"], started
    logs = warm_daemon.vmjob("logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "warm-hi\n"
    assert list((warm_daemon.spool / "templates").glob("*.save"))
    # its end is recorded at the guest's power-off; the domain goes ~1-2 s later (reaping here)
    deadline = time.monotonic() + 30
    while warm_daemon.reservations() or f"vmjob-{job_id}" in our_domains():
        assert time.monotonic() < deadline, our_domains()
        time.sleep(0.05)
