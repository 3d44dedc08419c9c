"""`vmjob smoke migrate`: live-migrate a clock-checking guest between two hosts, N rounds;
with `--gang FILE`, a gang's node0 through the daemon, checked from node1 (vmjobs.smoke_gang)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from vmjobs.cli.output import json_option
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
@click.option("--from", "source", default=None, metavar="HOST",
              help="Host name from the config, or a libvirt URI (not with --gang).")
@click.option("--to", "destination", default=None, metavar="HOST",
              help="Host name from the config, or a libvirt URI. With --gang: where node0 "
                   "goes on odd rounds (back on even ones); default: the daemon chooses.")
@click.option("--gang", "gang_file", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Through the daemon: submit this gang job file (see "
                   "docs/examples/migration-smoke.yaml), migrate its node0 each round and "
                   "report what node0 and node1 saw.")
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
@json_option
@click.pass_obj
def migrate(obj: Any, source: str | None, destination: str | None, gang_file: Path | None,
            rounds: int, mem: str, max_downtime: int, gap_slack: int, image: str,
            virt_type: str | None, as_json: bool) -> None:
    """Boot a guest that prints a counter, its TSC and CLOCK_MONOTONIC every 100 ms,
    live-migrate it back and forth, and check the counter never skips or repeats, the clocks
    never go backwards and the largest gap stays near the reported downtime.

    Prints one row per round; exits 1 on any violation. Needs the spool shared by both
    hosts (the guest's console is read from it) and gcc to build the guest probe.

    With --gang FILE (a daemon must run): the gang's node0 serves a counter on the gang's
    network and node1 checks it after each move; prints per round where node0 went, what it
    counted across the move and what node1 read over the network; exits 1 if a move or a
    check failed, node0's counter skipped or repeated, or the gang did not end 0.

    \b
    Examples:
      vmjob smoke migrate --from h1 --to h2
      vmjob smoke migrate --from qemu+tcp://10.0.0.1/system \\
          --to qemu+tcp://10.0.0.2/system --virt-type kvm --rounds 10 --mem 1G
      vmjob smoke migrate --gang docs/examples/migration-smoke.yaml --rounds 2 --json
    """
    config: Config = obj.config
    if gang_file is not None:
        if source is not None:
            raise click.UsageError("--from is not for --gang: node0 starts where the daemon "
                                   "places it (give --to)")
        context = click.get_current_context()
        for name, option in (("mem", "--mem"), ("gap_slack", "--gap-slack"),
                             ("image", "--image"), ("virt_type", "--virt-type")):
            if context.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"{option} is not for --gang: the gang file and the "
                                       "daemon's config decide it")
        _gang(gang_file, rounds, destination, max_downtime, as_json)
        return
    if source is None or destination is None:
        raise click.UsageError("give --from and --to (or --gang FILE)")
    memory_mib = parse_size_mib(mem, "--mem")
    found = resolve_image(config.spool, image)
    a = _endpoint(config, source, virt_type, found)
    b = _endpoint(config, destination, virt_type or a.virt_type, found)
    report = smoke_migrate(config.spool, found, a, b, rounds, memory_mib,
                           Policy(max_downtime_ms=max_downtime), float(gap_slack),
                           note=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps({"passed": report.passed, "ticks": report.ticks,
                               "violations": report.violations,
                               "rounds": [asdict(r) for r in report.rounds]}, indent=2))
    else:
        for line in format_table(report):
            click.echo(line)
        click.echo(f"{report.ticks} ticks checked")
    _verdict(report.passed, report.violations, as_json)


def _verdict(passed: bool, violations: list[str], as_json: bool) -> None:
    if not passed:
        if not as_json:
            for violation in violations:
                click.echo(f"VIOLATION: {violation}")
        error = VmjobsError(f"smoke migrate failed: {len(violations)} violation(s)")
        error.json_reported = as_json  # the report above says it
        raise error
    if not as_json:
        click.echo("PASS")


def _gang(path: Path, rounds: int, to: str | None, max_downtime: int, as_json: bool) -> None:
    from vmjobs.cli.connect import client_for
    from vmjobs.cli.options import spec_from_options
    from vmjobs.cli.submit import submission
    from vmjobs.smoke_gang import format_gang_report, smoke_gang

    spec = spec_from_options({}, path)
    if spec.nodes is None or len(spec.nodes) < 2:
        raise click.UsageError(f"--gang {path}: the job file must describe a gang of at least "
                               "2 members (nodes:)")
    client = client_for(None)
    try:
        report = smoke_gang(client, submission(spec, client), rounds, to,
                            max_downtime_ms=max_downtime, note=lambda m: click.echo(m, err=True))
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in format_gang_report(report):
            click.echo(line)
    _verdict(report.passed, report.violations, as_json)
