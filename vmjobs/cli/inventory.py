"""`vmjob inventory`: what vmjobs would see on a host, from saved libvirt XML, without libvirt.

An admin checks a new machine before adding it to the config: `virsh capabilities` and
`virsh nodedev-dumpxml` outputs in, the NUMA nodes, usable cpus, ordinary memory, hugepages,
distances and NICs (with IOMMU groups and SR-IOV relations) the placement engine would use out.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import click

from placement.units import format_page
from vmjobs.config import HostConfig, load
from vmjobs.units import format_cpu_list, format_mib
from vmjobs.virt.inventory import (
    InventoryError,
    build_host,
    describe,
    network_devices,
    nic_devices,
    nic_notes,
    parse_node_devices,
    parse_topology,
    unassignable,
)

FILE = click.Path(exists=True, dir_okay=False, readable=True)


def _read(path: str, option: str) -> str:
    text = Path(path).read_text(errors="replace")
    try:
        ET.fromstring(text)
    except ET.ParseError as exc:
        raise click.BadParameter(f"{path}: not XML ({exc})", param_hint=option) from None
    return text


def _host_config(obj: Any, config_path: str | None, host: str | None) -> HostConfig | None:
    if config_path is None and host is None:
        return None
    config = load(config_path) if config_path else obj.config
    if host is not None:
        return config.host(host)
    if len(config.hosts) == 1:
        return config.hosts[0]
    names = ", ".join(h.name for h in config.hosts)
    raise click.UsageError(f"--host is needed: the config names hosts {names}")


@click.command()
@click.option("--capabilities", "capabilities", type=FILE, required=True, metavar="FILE",
              help="Output of `virsh capabilities` on the host.")
@click.option("--nodedev", "nodedevs", type=FILE, multiple=True, metavar="FILE",
              help="Output of `virsh nodedev-dumpxml DEVICE` (one device, or several under "
                   "one root element). Repeatable.")
@click.option("--config", "config_path", type=FILE, metavar="FILE",
              help="Apply this config's reservations and NIC allow-list (default: vmjob's "
                   "--config when --host is given).")
@click.option("--host", "host", metavar="NAME", help="The config's host to apply.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def inventory(obj: Any, capabilities: str, nodedevs: tuple[str, ...], config_path: str | None,
              host: str | None, as_json: bool) -> None:
    """Show what vmjobs would see on a host, from saved libvirt XML.

    Without a config every network device is listed; with one, only the NICs its allow-list
    gives jobs (not those whose IOMMU group holds a device the host uses: a note says so), and
    the host's reserved cpus and memory are taken out. Memory is ordinary
    memory (the node's total less its hugepage pools); cpus are those a job can get
    (offline cpus, cpus listed in two cells and reserved cpus are left out).

    \b
    Examples:
      virsh capabilities > caps.xml
      virsh nodedev-dumpxml pci_0000_3b_00_0 > nic.xml
      vmjob inventory --capabilities caps.xml --nodedev nic.xml
      (echo '<devices>'; for d in $(virsh nodedev-list --cap pci); do
         virsh nodedev-dumpxml $d; done; echo '</devices>') > pci.xml
      vmjob inventory --capabilities caps.xml --nodedev pci.xml --config new.yaml --host n7 --json
    """
    try:
        topology = parse_topology(_read(capabilities, "--capabilities"))
    except InventoryError as exc:
        raise click.BadParameter(f"{capabilities}: {exc}", param_hint="--capabilities") from None
    if not topology.nodes:
        raise click.BadParameter(f"{capabilities}: no NUMA cells (<host><topology> is missing)",
                                 param_hint="--capabilities")
    pci = []
    for path in nodedevs:
        try:
            pci.extend(parse_node_devices(_read(path, "--nodedev")))
        except InventoryError as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--nodedev") from None
    chosen = _host_config(obj, config_path, host)
    if chosen is None:
        chosen = HostConfig(name=Path(capabilities).stem, uri="")
        devices = network_devices(pci)
        notes = list(unassignable(pci, {d.address for d in devices}).values())
    else:
        devices = nic_devices(pci, chosen.nic_allow)
        notes = nic_notes(pci, chosen.nic_allow)
    found = build_host(chosen, topology.nodes, devices, siblings_known=topology.siblings_known)
    view = describe(found, [*topology.notes, *notes])
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    _print(view)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print(view: dict[str, Any]) -> None:
    click.echo(f"host {view['host']}" + ("" if view["siblings_known"] else
                                         " (no SMT sibling data: --threads isolate refused)"))
    rows = [("NODE", "CPUS", "CORES", "MEMORY", "HUGEPAGES", "DISTANCES")]
    devices = [("NIC", "NODE", "IOMMU GROUP", "VENDOR:PRODUCT", "SR-IOV")]
    for node in view["nodes"]:
        pages = ", ".join(f"{count} x {format_page(int(size))}"
                          for size, count in node["hugepages"].items())
        rows.append((str(node["id"]), format_cpu_list(node["cpus"]) or "-", str(node["cores"]),
                     format_mib(node["memory_mib"]), pages or "-",
                     " ".join(f"{k}:{v}" for k, v in node["distances"].items()) or "-"))
        for d in node["devices"]:
            sriov = (f"VF of {d['pf']}" if d["pf"] else
                     f"PF of {', '.join(d['vfs'])}" if d["vfs"] else "-")
            group = "-" if d["iommu_group"] is None else str(d["iommu_group"])
            model = f"{d['vendor'].removeprefix('0x')}:{d['product'].removeprefix('0x')}"
            devices.append((d["address"], str(d["node"]), group, model, sriov))
    _table(rows)
    if len(devices) > 1:
        click.echo()
        _table(devices)
    for note in view["notes"]:
        click.echo(f"note: {note}")
