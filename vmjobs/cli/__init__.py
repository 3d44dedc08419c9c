"""`vmjob`: a thin layer that parses, calls one library function and prints.

Every failure a user can act on is one line on stderr and a non-zero exit, never a traceback:
usage errors exit 2, vmjob's own errors exit 1 (or the code the error carries).

Commands are loaded lazily (`COMMANDS`, click's documented LazyGroup pattern): a call imports
the root group and the one module of its command, so `vmjob list` never pays for libvirt,
paramiko or the placement engine (tests/unit/test_thin_client.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import click

from vmjobs import __version__
from vmjobs.config import Config, load
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


# command name -> "module:attribute", imported when the command runs (or --help lists them)
COMMANDS = {
    "run": "vmjobs.cli.run:run", "hosts": "vmjobs.cli.hosts:hosts",
    "inventory": "vmjobs.cli.inventory:inventory", "image": "vmjobs.cli.image:image",
    "serve": "vmjobs.cli.serve:serve", "submit": "vmjobs.cli.submit:submit",
    "list": "vmjobs.cli.jobs:list_jobs", "show": "vmjobs.cli.jobs:show",
    "logs": "vmjobs.cli.jobs:logs", "wait": "vmjobs.cli.jobs:wait",
    "cancel": "vmjobs.cli.jobs:cancel", "migrate": "vmjobs.cli.moves:migrate",
    "checkpoint": "vmjobs.cli.moves:checkpoint", "restore": "vmjobs.cli.moves:restore",
    "drain": "vmjobs.cli.moves:drain", "uncordon": "vmjobs.cli.moves:uncordon",
    "rebalance": "vmjobs.cli.moves:rebalance", "plan": "vmjobs.cli.plan:plan",
    "devcluster": "vmjobs.cli.devcluster:devcluster_group", "smoke": "vmjobs.cli.smoke:smoke",
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
        try:
            result = super().main(args=args, prog_name=prog_name or "vmjob",
                                  complete_var=complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx else "vmjob"
            fail(f"{exc.format_message()} (see '{path} --help')")
            sys.exit(2)
        except click.ClickException as exc:
            fail(exc.format_message())
            sys.exit(exc.exit_code)
        except VmjobsError as exc:
            fail(str(exc))
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted")
            sys.exit(130)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=VmjobGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", envvar="VMJOBS_CONFIG",
              help="Config file (default: $VMJOBS_CONFIG, /etc/vmjobs/config.yaml, "
                   "else one local host at qemu:///system).")
@click.version_option(__version__, prog_name="vmjob")
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
