"""The engine's view of the cluster at one moment, and how an allocation is described.

Every placement decision (the daemon's scheduler, a direct `vmjob run`, `vmjob hosts`,
migration, restore, the planners) starts from `snapshot`: hardware from libvirt's inventory,
holdings and cordons from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import placement
from placement import Allocation
from vmjobs.errors import VmjobsError
from vmjobs.store import Held, Store


def snapshot(store: Store, hosts: list[placement.Host],
             pinned: Callable[[Held], bool] = lambda _held: False) -> placement.Cluster:
    """The engine's view: hardware from libvirt, holdings from the store (migration
    placeholders too), hosts cordoned in the store (drain) taking nothing new. Holdings for
    which `pinned` is true are held with their request tied to their host, so the planners
    (which only move jobs whose request names no host) leave them where they are.

    Raises VmjobsError when a stored reservation no longer fits its host's hardware."""
    cluster = placement.Cluster(hosts)
    for name in store.cordoned():
        if name in cluster.hosts and cluster.hosts[name].state == placement.HostState.UP:
            cluster.set_state(name, placement.HostState.CORDONED)
    for held in store.held():
        if held.allocation.host in cluster.hosts:
            request = replace(held.request, host=held.allocation.host) if pinned(held) \
                else held.request
            try:
                cluster.reserve(held.job_id, held.allocation, request)
            except placement.Conflict as exc:
                raise VmjobsError(
                    f"job {held.job_id}'s reservation no longer matches host "
                    f"{held.allocation.host}: {exc}"
                ) from None
    return cluster


def describe_allocation(alloc: Allocation) -> str:
    """One line: cpus, nodes, memory and NICs (also kept in the job's PLACED event)."""
    nodes = ", ".join(f"node{s.node}" for s in alloc.nodes)
    text = f"cpus {','.join(map(str, alloc.cpus))} ({nodes}), {alloc.memory_mib} MiB"
    if alloc.devices:
        text += f", NICs {', '.join(alloc.devices)}"
    return text
