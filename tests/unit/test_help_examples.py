"""Every example in `vmjob ... --help` runs a command the minimal guest has: a busybox applet,
or a program brought in with --input (or a job file). `make check` or `./bench.sh` without
--input would fail in the guest with "not found"."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import click
import pytest

from vmjobs.cli import cli


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the root group loads its commands lazily
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*path, name)))
        else:
            found.append((" ".join((*path, name)), command))
    return found


def _examples() -> list[tuple[str, str]]:
    """(command, example line) for each example that gives a job's command after `--`; lines
    continued with a backslash are joined."""
    examples = []
    for name, command in _commands(cli):
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
