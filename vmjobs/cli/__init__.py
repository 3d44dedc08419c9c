"""`vmjob`: a thin layer that parses, calls one library function and prints.

Every failure a user can act on is one line on stderr and a non-zero exit, never a traceback:
usage errors exit 2, vmjob's own errors exit 1 (or the code the error carries).

Commands are loaded lazily (`COMMANDS`, click's documented LazyGroup pattern): a call imports
the root group and the one module of its command, so `vmjob list` never pays for libvirt,
paramiko or the placement engine (tests/unit/test_thin_client.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Any, NoReturn

import click

from vmjobs import __version__
from vmjobs.cli.output import print_error, wants_json
from vmjobs.config import DEFAULT_SOCKET, Config, load
from vmjobs.errors import VmjobsError


class Context:
    """What every command gets: the config, loaded on first use."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    @cached_property
    def config(self) -> Config:
        return load(self.config_path)


def fail(message: str) -> None:
    click.echo(f"vmjob: {message}", err=True)


def refuse(message: str, exc: BaseException, code: int, as_json: bool) -> NoReturn:
    """Every refusal ends here: one line on stderr, with --json also the JSON object on
    stdout (`vmjobs.cli.output`), and the exit code."""
    fail(message)
    if as_json and not getattr(exc, "json_reported", False):
        print_error(message, exc, code)
    sys.exit(code)


VERSION_PROBE_S = 2.0  # how long --version waits for a daemon's answer


def show_version(ctx: click.Context, value: bool) -> None:
    """--version: this client's version at once; then the daemon's, if one answers within
    VERSION_PROBE_S (at $VMJOBS_URL, else at the config's socket when that file exists; an
    ssh:// URL's connection has its own bound, transport.CONNECT_TIMEOUT_S, first)."""
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"vmjob, version {__version__}")
    sys.stdout.flush()
    answer = daemon_status(ctx.params.get("config_path"))
    if answer is not None:
        click.echo(f"daemon, version {answer[1].get('version', 'unknown')} ({answer[0]})")
    ctx.exit()


def daemon_status(config_path: str | None) -> tuple[str, dict[str, Any]] | None:
    """(where, GET /v1/status) of the daemon a command would talk to, or None if none
    answers (no URL and no socket file, a bad config, a refusal, a timeout)."""
    from vmjobs.client import Client  # only when asked: --version must stay quick

    url = os.environ.get("VMJOBS_URL")
    try:
        if url:
            client = Client.from_url(url, DEFAULT_SOCKET)
        else:
            socket = load(config_path).socket
            if not socket.exists():
                return None
            client = Client.from_url(None, socket)
        try:
            return client.target.describe(), client.call("GET", "/v1/status",
                                                         timeout=VERSION_PROBE_S)
        finally:
            client.close()
    except (VmjobsError, OSError):
        return None

# command name -> "module:attribute", imported when the command runs (or --help lists them)
COMMANDS = {
    "run": "vmjobs.cli.run:run", "hosts": "vmjobs.cli.hosts:hosts",
    "inventory": "vmjobs.cli.inventory:inventory", "image": "vmjobs.cli.image:image",
    "serve": "vmjobs.cli.serve:serve", "submit": "vmjobs.cli.submit:submit",
    "list": "vmjobs.cli.jobs:list_jobs", "show": "vmjobs.cli.jobs:show",
    "logs": "vmjobs.cli.jobs:logs", "wait": "vmjobs.cli.jobs:wait",
    "cancel": "vmjobs.cli.jobs:cancel", "migrate": "vmjobs.cli.moves:migrate",
    "checkpoint": "vmjobs.cli.moves:checkpoint", "restore": "vmjobs.cli.moves:restore",
    "resize": "vmjobs.cli.moves:resize",
    "drain": "vmjobs.cli.moves:drain", "uncordon": "vmjobs.cli.moves:uncordon",
    "rebalance": "vmjobs.cli.moves:rebalance", "plan": "vmjobs.cli.plan:plan",
    "devcluster": "vmjobs.cli.devcluster:devcluster_group", "smoke": "vmjobs.cli.smoke:smoke",
    "usage": "vmjobs.cli.usage:usage_command", "pools": "vmjobs.cli.pools:pools",
    "reserve": "vmjobs.cli.reserve:reserve", "release": "vmjobs.cli.reserve:release",
    "profiles": "vmjobs.cli.profiles:profiles",
    "shell": "vmjobs.cli.shell:shell", "attach": "vmjobs.cli.shell:attach",
    "kv": "vmjobs.cli.kv:kv",
}


class VmjobGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), COMMANDS[cmd_name]
        return command

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        as_json = wants_json(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args=args, prog_name=prog_name or "vmjob",
                                  complete_var=complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx else "vmjob"
            refuse(f"{exc.format_message()} (see '{path} --help')", exc, 2, as_json)
        except click.ClickException as exc:
            refuse(exc.format_message(), exc, exc.exit_code, as_json)
        except VmjobsError as exc:
            refuse(str(exc), exc, exc.exit_code, as_json)
        except (click.Abort, KeyboardInterrupt) as exc:
            refuse("interrupted", exc, 130, as_json)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=VmjobGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", envvar="VMJOBS_CONFIG",
              help="Config file (default: $VMJOBS_CONFIG, /etc/vmjobs/config.yaml, "
                   "else one local host at qemu:///system).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: show_version(ctx, value),
              help="Show vmjob's version, and the daemon's when one answers "
                   "($VMJOBS_URL, else the config's socket), then exit.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Run jobs inside minimal, pinned KVM guests.

    \b
    Examples:
      vmjob image build
      vmjob run --cpus 2 --mem 512M -- sh -c 'nproc; echo hi'
      vmjob hosts --json
    """
    ctx.obj = Context(config_path)


def main() -> None:
    cli.main()
