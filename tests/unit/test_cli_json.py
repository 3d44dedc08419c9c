"""`--json` on every command, refusals included (vmjobs.cli.output), through click's CliRunner:
no daemon runs here, so every daemon command is refused, which is what is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.clicommands import commands
from vmjobs.cli import cli
from vmjobs.cli.output import wants_json

# long-running, terminal-session or developer-only commands whose output is not a result
# to parse
WITHOUT_JSON = {"serve", "devcluster up", "devcluster down", "devcluster status",
                "devcluster env", "shell", "attach"}


def test_every_command_but_the_listed_ones_takes_json_from_the_one_helper() -> None:
    for name, command in commands(cli):
        options = [p for p in command.params if "--json" in p.opts]
        if name in WITHOUT_JSON:
            assert not options, name
            continue
        assert options, f"vmjob {name} has no --json"
        assert options[0].help and options[0].help.startswith("Machine-readable output"), name


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose socket has no daemon behind it."""
    path = tmp_path / "config.yaml"
    path.write_text(f"spool: {tmp_path / 'spool'}\nsocket: {tmp_path / 'none.sock'}\n"
                    "hosts: [{name: local, uri: 'test:///default'}]\n")
    return path


@pytest.mark.parametrize(("args", "code", "error_code"), [
    (["migrate", "3f9a", "--to", "h2"], 1, "no_daemon"),
    (["submit", "--no-wait", "--", "true"], 1, "no_daemon"),
    (["uncordon", "h1"], 1, "no_daemon"),
    (["rebalance", "--dry-run"], 1, "no_daemon"),
    (["show", "3f9a"], 1, "no_daemon"),
    (["list", "--state", "runing"], 2, "usage"),
    (["list", "-o", "id,size"], 2, "usage"),
    (["list", "--bogus"], 2, "usage"),
    (["wait", "3f9a", "--timeout", "1:60"], 2, "usage"),
    (["submit", "--name", "a\tb", "--", "true"], 2, "usage"),
    (["run", "--cpus", "many", "--", "true"], 2, "usage"),
    (["migrate", "3f9a", "--timeout", "soon"], 2, "usage"),
    (["list", "--url", "http://head"], 2, "usage"),  # a bad option value, not an error
    (["show", "3f9a", "--url", "ssh://"], 2, "usage"),
    (["run", "--pool", "nope", "--", "true"], 1, "not_found"),
])
def test_a_refusal_is_one_json_object_on_stdout_with_the_same_exit_code(
        config: Path, args: list[str], code: int, error_code: str) -> None:
    runner = CliRunner()
    plain = runner.invoke(cli, ["--config", str(config), *args])
    assert plain.exit_code == code, plain.output
    assert plain.stdout == ""
    assert plain.stderr.startswith("vmjob: ") and plain.stderr.count("\n") == 1
    shown = runner.invoke(cli, ["--config", str(config), *args, "--json"]
                          if "--" not in args else
                          ["--config", str(config), *args[:args.index("--")], "--json",
                           *args[args.index("--"):]])
    assert shown.exit_code == code
    answer = json.loads(shown.stdout)  # exactly one JSON document
    assert answer == {"error": plain.stderr[len("vmjob: "):].rstrip("\n"),
                      "code": error_code, "exit_code": code}
    assert shown.stderr == plain.stderr  # the line a person reads is still there


def test_a_symlink_in_input_is_a_usage_error_and_leaves_no_job(config: Path,
                                                               tmp_path: Path) -> None:
    """A bad --input is a bad option value: exit 2 like `--input /nonexistent` (it was 1)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "link").symlink_to("/etc/passwd")
    for command in ("run", "submit"):
        done = CliRunner().invoke(cli, ["--config", str(config), command, "--input",
                                        str(inputs), "--", "true"])
        assert done.exit_code == 2, (command, done.stderr)
        assert done.stderr == (f"vmjob: --input: {inputs / 'link'} is a symlink; only regular "
                               "files and directories are copied into the guest\n")
    assert not any((tmp_path / "spool" / "jobs").glob("*"))


def test_json_after_the_double_dash_belongs_to_the_job() -> None:
    assert wants_json(["list", "--json"])
    assert not wants_json(["run", "--", "jq", "--json"])
    assert wants_json(["run", "--json", "--", "true"])
