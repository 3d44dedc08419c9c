"""`vmjob`: a thin layer that parses, calls one library function and prints.

Every failure a user can act on is one line on stderr and a non-zero exit, never a traceback:
usage errors exit 2, vmjob's own errors exit 1 (or the code the error carries).
"""

from __future__ import annotations

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


class VmjobGroup(click.Group):
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


def _register() -> None:
    from vmjobs.cli.hosts import hosts
    from vmjobs.cli.image import image
    from vmjobs.cli.inventory import inventory
    from vmjobs.cli.jobs import cancel, list_jobs, logs, show, submit, wait
    from vmjobs.cli.moves import checkpoint, drain, migrate, rebalance, restore, uncordon
    from vmjobs.cli.plan import plan
    from vmjobs.cli.run import run
    from vmjobs.cli.serve import serve
    from vmjobs.cli.usage import usage_command

    for command in (run, hosts, inventory, image, serve, submit, list_jobs, show, logs, wait,
                    cancel, migrate, checkpoint, restore, drain, uncordon, rebalance, plan,
                    usage_command):
        cli.add_command(command)

    from vmjobs.cli.devcluster import devcluster_group

    cli.add_command(devcluster_group, "devcluster")
    from vmjobs.cli.smoke import smoke

    cli.add_command(smoke)


_register()
