"""The CLI imports only what a command needs (issue 10): a client command never loads libvirt,
paramiko (unless the URL is ssh://) or, for `list`, the placement engine.

Each case runs in a fresh interpreter (this one has imported everything already) and reports
`sys.modules` after the command ran far enough to reach the daemon (there is none: the URL
names a socket that does not exist, so the command fails with its one line, as it would
against a stopped daemon). A behaviour test, not a speed assertion: bench/queue.py measures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
from vmjobs.cli import cli
try:
    cli.main(args=sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules}
                        | {m for m in sys.modules if m.startswith(('vmjobs', 'placement.'))})))
"""


def modules_after(*args: str, url: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMJOBS_URL": url}
    env.pop("VMJOBS_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)
    assert "no vmjob daemon" in done.stderr or "Usage" in done.stdout, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("args", [("list",), ("list", "--all", "--json"), ("show", "x"),
                                  ("cancel", "x"), ("wait", "x"), ("logs", "x")])
def test_client_commands_load_no_libvirt_paramiko_or_placement(tmp_path: Path,
                                                               args: tuple[str, ...]) -> None:
    loaded = modules_after(*args, url=str(tmp_path / "none.sock"))
    assert "vmjobs.cli.jobs" in loaded  # the command itself did run
    assert not loaded & {"libvirt", "paramiko", "placement", "yaml", "vmjobs.cli.run",
                         "vmjobs.runner", "vmjobs.spec"}


def test_submit_loads_the_spec_but_no_libvirt_or_paramiko(tmp_path: Path) -> None:
    loaded = modules_after("submit", "--cpus", "1", "--", "true",
                           url=str(tmp_path / "none.sock"))
    assert "vmjobs.spec" in loaded  # checked before the daemon is looked for
    assert "placement.model" in loaded  # the request's types, not the engine
    assert not loaded & {"libvirt", "paramiko", "vmjobs.runner", "vmjobs.guest_protocol",
                         "placement.cluster", "placement.plans", "placement.swf", "yaml"}


def test_ssh_url_alone_imports_paramiko() -> None:
    # an ssh:// URL is parsed without paramiko; the tunnel module brings it in
    probe = ("import sys; from vmjobs.transport import parse_url; from pathlib import Path; "
             "t = parse_url('ssh://u@head', Path('/s')); before = 'paramiko' in sys.modules; "
             "import vmjobs.ssh; print(before, 'paramiko' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_help_lists_every_command_with_its_summary() -> None:
    from click.testing import CliRunner

    from vmjobs.cli import COMMANDS, cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        line = next((li for li in result.output.splitlines() if li.split()[:1] == [name]), "")
        assert len(line.split()) > 1, f"{name} has no summary in --help"
