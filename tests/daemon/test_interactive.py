"""Interactive jobs through the daemon (its console stream, `POST /v1/jobs/{id}/console`):
`vmjob run -i`, `vmjob shell` (also over `--url ssh://`) and `vmjob attach`, real guests,
clients driven through real pseudo-terminals (pexpect). Run under the guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-daemon-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_interactive.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.daemon.conftest import Daemon
from tests.daemon.test_remote import sshd  # noqa: F401 (a fixture)
from tests.daemon.users import make_users, run_as
from tests.guest.test_interactive import BOOT_S, PROMPT, drive_session
from vmjobs.client import ApiFailure, Client
from vmjobs.transport import Target

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Iterator[Daemon]:
    served = make_daemon("interactive")
    served.start()
    yield served
    # a job's end is told at its guest's power-off; its domain goes (and its cores are freed)
    # a moment later: wait for that before the daemon stops and the leftovers are looked for
    deadline = time.monotonic() + 60
    while served.reservations() and time.monotonic() < deadline:
        time.sleep(0.2)
    served.stop()


def spawn(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "vmjobs", "--config", str(daemon.config), *args],
                         dimensions=(24, 80), timeout=60, encoding="utf-8",
                         codec_errors="replace", env=env)


def test_run_i_reads_piped_stdin_through_the_daemon(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmjobs", "--config", str(daemon.config), "run", "-i", "--",
         "sh"], input="echo hi\nexit 4\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr + daemon.log_text()
    assert result.stdout == "hi\n"
    assert "submitted" in result.stderr  # it went through the daemon


def test_shell_session_through_the_daemon(daemon: Daemon) -> None:
    child = spawn(daemon, "shell", "--env", f"PS1={PROMPT}")
    child.expect(r"job ([0-9a-f]{8}) submitted", timeout=60)
    drive_session(child)
    assert child.exitstatus == 3, daemon.log_text()


def test_attach_sees_output_sends_input_and_detaches(daemon: Daemon) -> None:
    client = daemon.client()
    job = client.submit({"argv": ["sh", "-c", "echo begun; exec sh"], "stdin": "pipe",
                         "time_limit": 300})["id"]
    try:
        first = spawn(daemon, "attach", job)
        first.expect_exact(f"attached to job {job}", timeout=30)
        # the output from now on: what is typed here runs in the job and its output shows
        first.sendline("echo typed-$((3*3))")
        first.expect_exact("typed-9", timeout=BOOT_S)
        first.sendcontrol("c")  # the job has no terminal: Ctrl+C detaches, the job goes on
        first.expect_exact(f"detached from job {job}")
        first.expect(pexpect.EOF)
        first.close()
        assert first.exitstatus == 0
        assert client.job(job)["state"] == "RUNNING"
        second = spawn(daemon, "attach", job)
        second.expect_exact(f"attached to job {job}")
        second.sendline("echo again-$((2*2)); exit 5")
        second.expect_exact("again-4", timeout=60)
        second.expect(pexpect.EOF, timeout=60)
        second.close()
        assert second.exitstatus == 5  # the job ended while attached: its code
    finally:
        if client.job(job)["state"] in ("QUEUED", "PLACED", "STARTING", "RUNNING"):
            client.cancel(job)
        client.close()


def test_attach_refuses_an_ended_job(daemon: Daemon) -> None:
    client = daemon.client()
    job = client.submit({"argv": ["true"]})["id"]
    client.wait(job)
    client.close()
    result = daemon.vmjob("attach", job)
    assert result.returncode == 1  # a job's state, not a usage error (as migrate of one)
    assert result.stderr.strip() == f"vmjob: job {job} has ended (COMPLETED); see " \
                                    f"'vmjob logs {job}'"


def test_shell_over_ssh(daemon: Daemon, sshd: dict[str, Any]) -> None:  # noqa: F811
    (sshd["home"] / ".ssh" / "known_hosts").write_text(sshd["host_line"])
    url = f"ssh://root@127.0.0.1:{sshd['port']}{daemon.socket}"
    env = {**os.environ, "HOME": str(sshd["home"])}
    env.pop("SSH_AUTH_SOCK", None)
    child = pexpect.spawn(sys.executable, ["-m", "vmjobs", "shell", "--url", url, "--env",
                                           f"PS1={PROMPT}"],
                          dimensions=(30, 90), timeout=60, encoding="utf-8", env=env)
    child.expect_exact(PROMPT, timeout=BOOT_S)
    child.sendline("stty size; echo over-ssh-$((5*5))")
    child.expect(r"\r\n30 90\r\n")
    child.expect_exact("over-ssh-25")
    child.sendline("exit 7")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 7, daemon.log_text()


def _console_as_user(socket_path: str, job: str) -> dict[str, Any]:
    try:
        Client(Target(Path(socket_path))).console(job, with_input=False).close()
    except ApiFailure as exc:
        return {"status": exc.status, "error": str(exc)}
    return {"status": 101}


def test_console_refusals_and_ownership(daemon: Daemon) -> None:
    client = daemon.client()
    job = client.submit({"argv": ["sleep", "300"], "time_limit": 300})["id"]
    try:
        with pytest.raises(ApiFailure) as plain:  # a plain POST: no upgrade asked
            client.call("POST", f"/v1/jobs/{job}/console")
        assert plain.value.status == 426
        assert "Upgrade: vmjob-console/1" in str(plain.value)
        with pytest.raises(ApiFailure) as no_input:
            client.console(job, with_input=True)
        assert (no_input.value.status, no_input.value.code) == (409, "no_input")
        assert str(no_input.value) == (f"job {job} takes no input: it was not started with "
                                       "'vmjob run -i' or 'vmjob shell'")
        with make_users(1) as (other,):
            seen = run_as(other, _console_as_user, str(daemon.socket), job)
        assert seen["status"] == 403, seen
        assert "root" in seen["error"]  # the refusal names the owner
    finally:
        client.cancel(job)
        client.close()
