"""`vmjob hosts`: the cluster's capacity, free and total, per host and NUMA node."""

from __future__ import annotations

import json
from typing import Any

import click

from placement import HostUsage
from vmjobs.cli.connect import client_for
from vmjobs.cli.output import json_option
from vmjobs.config import Config, HostConfig, system_warnings
from vmjobs.errors import NotFound
from vmjobs.hosts_view import HostView, host_views
from vmjobs.units import format_mib


@click.command()
@click.argument("host", required=False)
@json_option
@click.option("--check", is_flag=True,
              help="Only validate the config and list its hosts; connect to nothing.")
@click.option("--url", default=None, metavar="URL", envvar="VMJOBS_URL",
              help="Ask the daemon at this URL (unix:///path/to/vmjobs.sock or "
                   "ssh://user@head; default: $VMJOBS_URL) instead of the config's hosts.")
@click.pass_obj
def hosts(obj: object, host: str | None, as_json: bool, check: bool, url: str | None) -> None:
    """Show cores, memory and NICs free/total per host and NUMA node.

    Cores reserved for the host OS (config `reserved_cpus`) are not counted; NICs are only
    those the config allows jobs to have. Each NIC is listed under its node with its IOMMU
    group: a NIC nobody holds is "blocked" while a NIC of its group (or its SR-IOV PF/VF) is
    held, since VFIO gives a whole group to one guest.

    \b
    Examples:
      vmjob hosts
      vmjob hosts node1 --json
      vmjob hosts --url ssh://alice@head          # as the daemon there sees them
      vmjob --config /etc/vmjobs/config.yaml.new hosts --check   # before installing it
    """
    if url and not check:
        # the daemon's view (GET /v1/hosts), as `list` shows the daemon's jobs: no config here
        client = client_for(url)
        try:
            views = client.hosts()
            warnings = list(client.status().get("warnings") or [])
        finally:
            client.close()
        if host is not None:
            views = [v for v in views if v["name"] == host]
            if not views:
                raise NotFound(f"unknown host {host!r} at {url}")
        warnings += [w for v in views for w in v.get("warnings", [])]
    else:
        config = click.get_current_context().obj.config  # a bad config fails here, exit 1
        if check:
            _print_checked(config, host, as_json)
            return
        local = host_views(config, host)
        views = [v.to_dict() for v in local]
        warnings = system_warnings(config) + [w for v in local for w in v.warnings]
    if as_json:
        click.echo(json.dumps(views, indent=2))
        return
    rows = [("HOST/NODE", "STATE", "JOBS", "CORES FREE/TOTAL", "MEMORY FREE/TOTAL",
             "NICS FREE/TOTAL")]
    for view in views:
        rows.extend(view_rows(view))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for line in warnings:
        click.echo(f"warning: {line}", err=True)


def usage_rows(name: str, usage: HostUsage) -> list[tuple[str, str, str, str, str, str]]:
    """`view_rows` of a reachable host's usage."""
    return view_rows(HostView(name, "", usage).to_dict())


def view_rows(view: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The table rows of one host in its JSON form (`HostView.to_dict`, `GET /v1/hosts`): the
    host, each NUMA node, and under each node its NICs with their state (free / held /
    blocked), the job holding them and their IOMMU group; a host that is down, one row."""
    if "nodes" not in view:
        return [(view["name"], "down", "-", "-", "-", view.get("error") or "")]
    rows = [(view["name"], view["state"], str(view["jobs"]),
             f"{view['cpus_free']}/{view['cpus_total']}",
             f"{format_mib(view['memory_free_mib'])}/{format_mib(view['memory_total_mib'])}",
             f"{view['nics_free']}/{view['nics_total']}")]
    for node in view["nodes"]:
        rows.append((f"  node{node['node']}", "", "", f"{node['cpus_free']}/{node['cpus_total']}",
                     f"{format_mib(node['memory_free_mib'])}/"
                     f"{format_mib(node['memory_total_mib'])}",
                     f"{node['nics_free']}/{node['nics_total']}"))
        for nic in node.get("nics", []):
            state = "held" if nic["holder"] else "blocked" if nic.get("blocked") else "free"
            group = "" if nic.get("iommu_group") is None else f"group {nic['iommu_group']}"
            why = f" ({nic['blocked']})" if nic.get("blocked") else ""
            vf = f" VF of {nic['pf']}" if nic.get("pf") else ""
            rows.append((f"    {nic['address']}", state, nic["holder"] or "", "", "",
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
        click.echo(f"  {h.name}  {h.uri}  pools {','.join(h.pools)}  reserved cpus {reserved}  "
                   f"nics {','.join(h.nic_allow) or '-'}")


def _host_dict(h: HostConfig) -> dict[str, object]:
    return {"name": h.name, "uri": h.uri, "pools": list(h.pools),
            "reserved_cpus": sorted(h.reserved_cpus), "labels": dict(h.labels),
            "nics": list(h.nic_allow)}
