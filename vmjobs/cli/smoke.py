"""`vmjob smoke migrate`: live-migrate a clock-checking guest between two hosts, N rounds."""

from __future__ import annotations

from typing import Any

import click

from vmjobs.config import Config
from vmjobs.errors import VmjobsError
from vmjobs.image import resolve_image
from vmjobs.migration import Policy
from vmjobs.smoke import Endpoint, _allocation, format_table, smoke_migrate
from vmjobs.units import parse_size_mib
from vmjobs.virt import VirtError, probe
from vmjobs.virt.conn import open_uri


@click.group()
def smoke() -> None:
    """Smoke tests for hypervisor developers.

    \b
    Example:
      vmjob smoke migrate --from h1 --to h2 --rounds 4
    """


def _endpoint(config: Config, given: str, virt_type: str | None, image: Any) -> Endpoint:
    if "://" in given:
        chosen = virt_type or (config.virt_type if config.virt_type != "auto" else None)
        if chosen is None:
            raise VmjobsError(f"{given}: give --virt-type kvm|qemu for a host given by URI")
        return Endpoint(given, given, chosen)
    host = config.host(given)
    if virt_type:
        return Endpoint(host.name, host.uri, virt_type)
    try:
        conn = open_uri(host.uri)
    except VirtError as exc:
        raise VmjobsError(f"cannot connect to {host.name} at {host.uri}: "
                          f"{exc.get_error_message()}") from None
    try:
        chosen = probe.virt_type(config, host, conn, image, _allocation(host.name, 0, 128),
                                 lambda m: click.echo(m, err=True))
    finally:
        conn.close()
    return Endpoint(host.name, host.uri, chosen)


@smoke.command("migrate")
@click.option("--from", "source", required=True, metavar="HOST",
              help="Host name from the config, or a libvirt URI.")
@click.option("--to", "destination", required=True, metavar="HOST",
              help="Host name from the config, or a libvirt URI.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Migrations (A->B, B->A, ...).")
@click.option("--mem", "mem", default="256M", show_default=True, help="Guest memory.")
@click.option("--max-downtime", type=click.IntRange(1, 60000), default=300,
              show_default=True, metavar="MS", help="Initial downtime limit.")
@click.option("--gap-slack", type=click.IntRange(0, 60000), default=1000, show_default=True,
              metavar="MS", help="Allowed tick gap beyond the interval plus reported downtime.")
@click.option("--image", default="default", show_default=True, help="Guest image.")
@click.option("--virt-type", type=click.Choice(["kvm", "qemu"]), default=None,
              help="Override the config's virt_type (needed for hosts given by URI "
                   "when virt_type is auto).")
@click.pass_obj
def migrate(obj: Any, source: str, destination: str, rounds: int, mem: str, max_downtime: int,
            gap_slack: int, image: str, virt_type: str | None) -> None:
    """Boot a guest that prints a counter, its TSC and CLOCK_MONOTONIC every 100 ms,
    live-migrate it back and forth, and check the counter never skips or repeats, the clocks
    never go backwards and the largest gap stays near the reported downtime.

    Prints one row per round; exits 1 on any violation. Needs the spool shared by both
    hosts (the guest's console is read from it) and gcc to build the guest probe.

    \b
    Examples:
      vmjob smoke migrate --from h1 --to h2
      vmjob smoke migrate --from qemu+tcp://10.0.0.1/system \\
          --to qemu+tcp://10.0.0.2/system --virt-type kvm --rounds 10 --mem 1G
    """
    config: Config = obj.config
    memory_mib = parse_size_mib(mem, "--mem")
    found = resolve_image(config.spool, image)
    a = _endpoint(config, source, virt_type, found)
    b = _endpoint(config, destination, virt_type or a.virt_type, found)
    report = smoke_migrate(config.spool, found, a, b, rounds, memory_mib,
                           Policy(max_downtime_ms=max_downtime), float(gap_slack),
                           note=lambda m: click.echo(m, err=True))
    for line in format_table(report):
        click.echo(line)
    click.echo(f"{report.ticks} ticks checked")
    if not report.passed:
        for violation in report.violations:
            click.echo(f"VIOLATION: {violation}")
        raise click.ClickException(f"smoke migrate failed: {len(report.violations)} "
                                   "violation(s)")
    click.echo("PASS")
