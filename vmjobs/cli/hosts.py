"""`vmjob hosts`: the cluster's capacity, free and total, per host and NUMA node."""

from __future__ import annotations

import json

import click

from placement import HostUsage
from vmjobs.cli.output import json_option
from vmjobs.config import Config, HostConfig, system_warnings
from vmjobs.hosts_view import host_views
from vmjobs.units import format_mib


@click.command()
@click.argument("host", required=False)
@json_option
@click.option("--check", is_flag=True,
              help="Only validate the config and list its hosts; connect to nothing.")
@click.pass_obj
def hosts(obj: object, host: str | None, as_json: bool, check: bool) -> None:
    """Show cores, memory and NICs free/total per host and NUMA node.

    Cores reserved for the host OS (config `reserved_cpus`) are not counted; NICs are only
    those the config allows jobs to have. Each NIC is listed under its node with its IOMMU
    group: a NIC nobody holds is "blocked" while a NIC of its group (or its SR-IOV PF/VF) is
    held, since VFIO gives a whole group to one guest.

    \b
    Examples:
      vmjob hosts
      vmjob hosts node1 --json
      vmjob --config /etc/vmjobs/config.yaml.new hosts --check   # before installing it
    """
    config = click.get_current_context().obj.config  # a bad config fails here, exit 1
    if check:
        _print_checked(config, host, as_json)
        return
    views = host_views(config, host)
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in views], indent=2))
        return
    rows = [("HOST/NODE", "STATE", "JOBS", "CORES FREE/TOTAL", "MEMORY FREE/TOTAL",
             "NICS FREE/TOTAL")]
    for view in views:
        usage = view.usage
        if usage is None:
            rows.append((view.name, "down", "-", "-", "-", view.error or ""))
            continue
        rows.extend(usage_rows(view.name, usage))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for line in system_warnings(config) + [w for view in views for w in view.warnings]:
        click.echo(f"warning: {line}", err=True)


def usage_rows(name: str, usage: HostUsage) -> list[tuple[str, str, str, str, str, str]]:
    """The table rows of one reachable host: the host, each NUMA node, and under each node its
    NICs with their state (free / held / blocked), the job holding them and their IOMMU group."""
    rows = [(name, usage.state.value, str(usage.jobs), f"{usage.cpus_free}/{usage.cpus_total}",
             f"{format_mib(usage.memory_free_mib)}/{format_mib(usage.memory_total_mib)}",
             f"{usage.nics_free}/{usage.nics_total}")]
    for node in usage.nodes:
        rows.append((f"  node{node.node}", "", "", f"{node.cpus_free}/{node.cpus_total}",
                     f"{format_mib(node.memory_free_mib)}/{format_mib(node.memory_total_mib)}",
                     f"{node.nics_free}/{node.nics_total}"))
        for nic in node.nics:
            state = "held" if nic.holder else "blocked" if nic.blocked else "free"
            group = "" if nic.iommu_group is None else f"group {nic.iommu_group}"
            why = f" ({nic.blocked})" if nic.blocked else ""
            vf = f" VF of {nic.pf}" if nic.pf else ""
            rows.append((f"    {nic.address}", state, nic.holder or "", "", "",
                         f"{group}{vf}{why}".strip()))
    return rows


def _print_checked(config: Config, host: str | None, as_json: bool) -> None:
    """The config's hosts as it was understood, without touching libvirt (for provisioning:
    a template is checked before it replaces the real config)."""
    chosen = [config.host(host)] if host else list(config.hosts)
    if as_json:
        click.echo(json.dumps({"config": config.path, "spool": str(config.spool),
                               "socket": str(config.socket),
                               "hosts": [_host_dict(h) for h in chosen]}, indent=2))
        return
    click.echo(f"{config.path}: valid; spool {config.spool}, socket {config.socket}, "
               f"{len(config.hosts)} host(s)")
    for h in chosen:
        reserved = ",".join(map(str, sorted(h.reserved_cpus))) or "-"
        click.echo(f"  {h.name}  {h.uri}  pool {h.pool}  reserved cpus {reserved}  "
                   f"nics {','.join(h.nic_allow) or '-'}")


def _host_dict(h: HostConfig) -> dict[str, object]:
    return {"name": h.name, "uri": h.uri, "pool": h.pool,
            "reserved_cpus": sorted(h.reserved_cpus), "labels": dict(h.labels),
            "nics": list(h.nic_allow)}
