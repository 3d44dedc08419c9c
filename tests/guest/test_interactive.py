"""Interactive jobs without a daemon (`vmjob run -i`, `vmjob shell` run directly): real guests,
the client driven through a real pseudo-terminal (pexpect) where it needs one. Run under the
guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/guest/test_interactive.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.guest.conftest import Env, our_domains, write_config

pytestmark = pytest.mark.guest
PROMPT = "@P@ "  # the guest shell's PS1 (given with --env): easy to tell from echoed input
BOOT_S = 180  # a generous bound for a cold boot to a prompt on a loaded machine


def spawn_vmjob(env: Env, *args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "vmjobs", "--config", str(env.config), *args],
                         dimensions=(rows, cols), timeout=60, encoding="utf-8",
                         codec_errors="replace")


def drive_session(child: pexpect.spawn) -> None:
    """What a person does in a shell: a command, `stty size` before and after a resize,
    Ctrl+C of a long sleep, a command after it, `exit 3`."""
    child.expect_exact(PROMPT, timeout=BOOT_S)
    child.sendline("echo marker-$((6*7))")
    child.expect_exact("marker-42")
    child.sendline("stty size")
    child.expect(r"\r\n24 80\r\n")
    child.setwinsize(33, 101)  # SIGWINCH to vmjob, which sends the new size
    child.sendline("stty size")
    child.expect(r"\r\n33 101\r\n")
    # "ready" is printed by the forked child itself, once it is the foreground process with
    # SIGINT's default action (the interactive shell ignores SIGINT around a fork)
    child.sendline("sh -c 'echo ready-$((2+2)); exec sleep 100'")
    child.expect_exact("ready-4")
    child.sendcontrol("c")  # the byte goes through the guest pty: SIGINT to `sleep`
    child.expect_exact(PROMPT, timeout=30)
    child.sendline("echo after-$?")
    child.expect_exact("after-130", timeout=30)  # a sleep still running would hold this 100 s
    child.sendline("exit 3")
    child.expect(pexpect.EOF, timeout=60)
    child.close()


def test_shell_session_direct(guest_env: Env) -> None:
    child = spawn_vmjob(guest_env, "shell", "--env", f"PS1={PROMPT}")
    drive_session(child)
    assert child.exitstatus == 3, child.before
    assert our_domains() == []


def test_shell_timeout_ends_it_with_a_message_and_restores_the_terminal(
        guest_env: Env) -> None:
    vmjob = shlex.join([sys.executable, "-m", "vmjobs", "--config", str(guest_env.config),
                        "shell", "--timeout", "10s", "--env", f"PS1={PROMPT}"])
    # the terminal's settings (stty -g) before and after, from the same terminal
    child = pexpect.spawn("sh", ["-c", f"stty -g; {vmjob}; echo rc=$?; stty -g"],
                          dimensions=(24, 80), timeout=BOOT_S, encoding="utf-8")
    child.expect(r"([0-9a-f:]{20,})\r\n")
    before = child.match.group(1)
    child.expect(r"TIMEOUT: time limit of 10s reached; guest stopped")
    child.expect(r"rc=(\d+)\r\n")
    assert child.match.group(1) == "124"
    child.expect(r"([0-9a-f:]{20,})\r\n")
    assert child.match.group(1) == before
    child.expect(pexpect.EOF)
    assert our_domains() == []


def test_run_i_reads_piped_stdin_direct(guest_env: Env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmjobs", "--config", str(guest_env.config), "run", "-i",
         "--", "sh"], input="echo hi\nexit 4\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr
    assert result.stdout == "hi\n"


def test_without_i_the_job_reads_nothing(guest_env: Env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmjobs", "--config", str(guest_env.config), "run", "--",
         "sh", "-c", "wc -c"], input="ignored\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_warm_start_config_starts_an_interactive_job_cold(guest_env: Env,
                                                         tmp_path: Path) -> None:
    config = write_config(tmp_path / "warm.yaml", guest_env.spool, start="warm")
    result = subprocess.run(
        [sys.executable, "-m", "vmjobs", "--config", str(config), "run", "-i", "--", "sh"],
        input="echo warm-$((2*3))\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "warm-6\n"
    assert re.search(r"starting cold: the job is interactive \(stdin\)", result.stderr)
