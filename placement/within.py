"""A held reservation's share of a host as a host of its own, so that the engine places jobs
*inside* a reservation with the same filters and scorers as anywhere else.

Pure: no I/O, no import from vmjobs.
"""

from __future__ import annotations

from dataclasses import replace

from placement.ledger import pages_for
from placement.model import Allocation, Host, HostState, Node


def restrict(host: Host, allocation: Allocation) -> Host:
    """The part of `host` that `allocation` holds: its cpus (not the idle siblings an
    `isolate` reservation keeps idle: they stay idle), each node's memory share (as hugepages
    of the allocation's size when it has one), and its NICs. Same name, labels and pools; up;
    no reserved cpus. Nodes the allocation does not touch are left out, except those of its
    NICs (with no cpus or memory).

    Raises ValueError when `allocation` is on another host or names a device the host lacks.
    """
    if allocation.host != host.name:
        raise ValueError(f"allocation on {allocation.host}, not {host.name}")
    shares = {s.node: s for s in allocation.nodes}
    devices = {d.address: d for d in host.devices}
    missing = [a for a in allocation.devices if a not in devices]
    if missing:
        raise ValueError(f"{host.name} has no device {', '.join(missing)}")
    kept_devices = tuple(devices[a] for a in allocation.devices)
    device_nodes = {d.node for d in kept_devices}
    keep = frozenset(allocation.cpus)
    nodes = []
    for node in host.nodes:
        share = shares.get(node.id)
        if share is None and node.id not in device_nodes:
            continue
        cpus = tuple(replace(c, siblings=c.siblings & keep) for c in node.cpus
                     if share is not None and c.id in share.cpus)
        memory = share.memory_mib if share is not None else 0
        if allocation.hugepage_kib:
            pages = pages_for(memory, allocation.hugepage_kib)
            nodes.append(Node(node.id, cpus, 0, ((allocation.hugepage_kib, pages),),
                              node.distances))
        else:
            nodes.append(Node(node.id, cpus, memory, (), node.distances))
    return replace(host, nodes=tuple(nodes), devices=kept_devices,
                   reserved_cpus=frozenset(), state=HostState.UP)
