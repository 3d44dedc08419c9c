"""What a host's config entry says that the host itself contradicts, found when it connects.

Warnings, not errors: one config file serves hosts that differ, and a host's hardware is
known only once it answers. The daemon logs them when it connects a host and answers them in
`/v1/hosts`; `vmjob hosts` prints them. One exception is refused: a second entry for a libvirt
daemon already connected under another name (its guests would be reconciled by both entries
as the other's leftovers and destroyed) — `same_host` finds it by the host's UUID.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from placement import Node
from vmjobs.config import HostConfig
from vmjobs.units import format_cpu_list, format_mib


def host_warnings(config: HostConfig, nodes: Sequence[Node], nic_backend: str) -> list[str]:
    """One line per setting of `config` that the host's NUMA `nodes` (as libvirt reports
    them, before reservations) make wrong or useless; [] when none."""
    cpus = {cpu.id for node in nodes for cpu in node.cpus}
    memory_mib = sum(node.memory_mib for node in nodes)
    node_ids = {node.id for node in nodes}
    found = []
    missing = config.reserved_cpus - cpus
    if missing:
        which = (f"cpus {format_cpu_list(missing)} are" if len(missing) > 1
                 else f"cpu {format_cpu_list(missing)} is")
        found.append(f"reserved_cpus: {which} not on this host (it has {format_cpu_list(cpus)})")
    if cpus and cpus <= config.reserved_cpus:
        found.append("reserved_cpus: every cpu of this host is reserved: no job can run here")
    if config.reserved_memory_mib and config.reserved_memory_mib >= memory_mib:
        found.append(f"reserved_memory: {format_mib(config.reserved_memory_mib)} is all of "
                     f"this host's {format_mib(memory_mib)} or more: no job can run here")
    if nic_backend == "emulated":
        for nic in config.emulated_nics:
            if nic.node not in node_ids:
                found.append(f"emulated_nics: {nic.name} is on NUMA node {nic.node}, which "
                             f"this host lacks (nodes {format_cpu_list(node_ids)}): it is "
                             "never offered")
    return [f"host {config.name}: {line}" for line in found]


def host_uuid(capabilities_xml: str) -> str | None:
    """The host's UUID from its capabilities (libvirt's `host_uuid`), if it reports one."""
    uuid = ET.fromstring(capabilities_xml).findtext("./host/uuid")
    return uuid.strip().lower() if uuid else None


def same_host(name: str, uuid: str | None, connected: Mapping[str, str | None]) -> str | None:
    """The name under which the libvirt host `uuid` is already connected, if another."""
    if uuid is None:
        return None
    return next((other for other, seen in connected.items()
                 if other != name and seen == uuid), None)


def duplicate_message(name: str, other: str, uuid: str) -> str:
    return (f"host {name}: the same libvirt host as {other} (host UUID {uuid}); configure "
            "each host once")
