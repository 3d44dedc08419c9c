"""Bad input to `vmjob run`: one line on stderr, non-zero exit, nothing left behind."""

from __future__ import annotations

import pytest

from tests.guest.conftest import Env, our_domains
from tests.guest.test_run import job_dirs, reservations

pytestmark = pytest.mark.guest

CASES = {
    "mem zero": (["--mem", "0"], "invalid --mem '0': must be greater than zero"),
    "mem negative": (["--mem", "-1"], "invalid --mem '-1'"),
    "mem words": (["--mem", "abc"], "invalid --mem 'abc'"),
    "mem unit": (["--mem", "64Q"], "invalid --mem '64Q'"),
    "cpus zero": (["--cpus", "0"], "--cpus"),
    "cpus words": (["--cpus", "abc"], "--cpus"),
    "timeout": (["--timeout", "soon"], "invalid --timeout 'soon'"),
    "env": (["--env", "NOEQUALS"], "invalid --env 'NOEQUALS'"),
    "env reserved": (["--env", "VMJOB_ID=x"], "--env VMJOB_ID is set by vmjob"),
    "unknown host": (["--host", "nosuch"], "unknown host 'nosuch' (configured: local)"),
    "unknown image": (["--image", "nosuch"], "unknown image 'nosuch'"),
    "never fits strict": (
        ["--cpus", "64", "--numa", "strict"],
        "largest NUMA node on any host has 2 cores; asked for 64 with --numa strict",
    ),
    "never fits memory": (["--mem", "4T"], "asked for 4096 GiB"),
    "too many nics": (["--nics", "3"], "NIC"),
    "missing input": (["--input", "/nonexistent/dir"], "--input /nonexistent/dir: not a directory"),
}


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_leaves_nothing(guest_env: Env, args: list[str],
                                                  message: str) -> None:
    before = job_dirs(guest_env)
    result = guest_env.vmjob("run", *args, "--", "true")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmjob: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert our_domains() == []
    assert reservations(guest_env) == 0
    assert job_dirs(guest_env) == before


def test_no_command_is_refused(guest_env: Env) -> None:
    result = guest_env.vmjob("run")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
