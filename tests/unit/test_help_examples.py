"""Every example in `vmjob ... --help` runs a command the minimal guest has: a busybox applet,
or a program brought in with --input (or a job file). `make check` or `./bench.sh` without
--input would fail in the guest with "not found"."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from tests.clicommands import commands
from vmjobs.cli import cli


def _examples() -> list[tuple[str, str]]:
    """(command, example line) for each example that gives a job's command after `--`; lines
    continued with a backslash are joined."""
    examples = []
    for name, command in commands(cli):
        lines = (command.help or "").splitlines()
        joined: list[str] = []
        for line in lines:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line.strip()
            else:
                joined.append(line.strip())
        examples += [(name, line) for line in joined
                     if line.startswith(("vmjob ", "JOB=$(vmjob")) and " -- " in line]
    return examples


def test_there_are_examples_to_check() -> None:
    assert {name for name, _ in _examples()} >= {"run", "submit"}


@pytest.mark.parametrize(("name", "example"), _examples())
def test_each_example_runs_something_the_guest_has(name: str, example: str) -> None:
    busybox = shutil.which("busybox")
    assert busybox, "busybox (busybox-static, the guest's userland) is not installed"
    applets = set(subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split())
    before, _, after = example.partition(" -- ")
    program = shlex.split(after.split(")")[0].split("#")[0])[0]
    if program.startswith("./"):
        assert "--input" in before or " -f " in before, (
            f"vmjob {name}: {example!r} runs {program} but brings no --input to find it in")
    else:
        assert program in applets, f"vmjob {name}: {example!r}: the guest has no {program}"
