"""`vmjob devcluster up|down|status|env`: N libvirt hosts on this machine, in namespaces."""

from __future__ import annotations

from pathlib import Path

import click

from vmjobs import devcluster

_NAME = click.option("--name", default=devcluster.DEFAULT_NAME, show_default=True,
                     help="Which dev cluster (several may run side by side).")


def _note(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def devcluster_group() -> None:
    """A cluster of hosts h1..hN on this machine, for tests and for trying vmjobs out.

    Each host is a network + mount + UTS namespace with its own libvirtd listening on TCP,
    joined by a bridge; the spool is shared. Needs root.

    \b
    Examples:
      vmjob devcluster up --hosts 3
      eval "$(vmjob devcluster env)"; vmjob image build; vmjob hosts
      vmjob devcluster down
    """


@devcluster_group.command("up")
@click.option("--hosts", "count", type=int, default=3, show_default=True,
              help="Number of hosts (h1..hN).")
@click.option("--subnet", default=None, metavar="CIDR",
              help=f"A private /24 used only on the cluster's bridge [default: "
                   f"{devcluster.DEFAULT_SUBNET}].")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Spool shared by the hosts [default: {devcluster.SPOOL_ROOT}/NAME].")
@click.option("--nics", type=int, default=2, show_default=True,
              help="Emulated NICs declared per host.")
@_NAME
def up(count: int, subnet: str | None, spool: Path | None, nics: int, name: str) -> None:
    """Start the hosts (idempotent: healthy hosts are kept) and write a config.

    \b
    Examples:
      vmjob devcluster up
      vmjob devcluster up --hosts 2 --name ci --subnet 10.231.7.0/24
    """
    state = devcluster.up(name, count, subnet, spool, nics, _note)
    click.echo(f"dev cluster {name}: {len(state.hosts)} hosts up")
    click.echo(f"config: {state.layout.config_path}")
    click.echo(devcluster.env_line(name))


@devcluster_group.command("down")
@_NAME
def down(name: str) -> None:
    """Stop every host and remove its namespaces, links, processes and mounts.

    The spool is kept (images are reused by the next 'up').

    \b
    Example:
      vmjob devcluster down
    """
    if devcluster.down(name, _note):
        click.echo(f"dev cluster {name}: down")
    else:
        click.echo(f"dev cluster {name}: nothing to remove")


@devcluster_group.command("status")
@_NAME
def status(name: str) -> None:
    """Show each host, its address, and whether its libvirtd answers. Exit 1 if any does not.

    \b
    Example:
      vmjob devcluster status
    """
    state = devcluster.status(name)
    click.echo(f"dev cluster {name}: bridge {state.layout.bridge} "
               f"{state.layout.bridge_address}, spool {state.layout.spool}")
    click.echo(f"config: {state.layout.config_path}")
    rows = [("HOST", "URI", "INIT", "LIBVIRTD", "DOMAINS", "PROBLEM")]
    for host in state.hosts:
        rows.append((host.name, host.uri, str(host.init_pid or "-"),
                     "up" if host.libvirtd else "down",
                     "-" if host.domains is None else str(host.domains), host.problem or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not state.up:
        raise click.ClickException(f"dev cluster {name} is not healthy "
                                   "(run 'vmjob devcluster up' to repair it)")


@devcluster_group.command("env")
@_NAME
def env(name: str) -> None:
    """Print the shell line that points vmjob at the dev cluster's config.

    \b
    Example:
      eval "$(vmjob devcluster env)"
    """
    click.echo(devcluster.env_line(name))
