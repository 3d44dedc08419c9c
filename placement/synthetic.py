"""Synthetic hardware for simulations, benchmarks and tests: regular hosts built from numbers."""

from __future__ import annotations

from typing import Any

from placement.model import Cpu, Device, Host, HostState, Node


def make_host(
    name: str,
    nodes: int = 2,
    cores: int = 16,
    threads: int = 1,
    memory_mib: int = 65536,
    nics_per_node: int = 0,
    hugepages: tuple[tuple[int, int], ...] = (),
    reserved_cpus: frozenset[int] = frozenset(),
    pools: tuple[str, ...] = ("default",),
    labels: tuple[tuple[str, str], ...] = (),
    state: HostState = HostState.UP,
    bus: int = 3,
) -> Host:
    """A host of `nodes` identical NUMA nodes, each with `cores` cores of `threads` threads.

    Cpu ids follow Linux's usual SMT numbering: first thread of every core, then the second
    (with 2 nodes x 4 cores x 2 threads: node0 has 0-3 and 8-11). NICs are numbered
    0000:<bus + node>:00.<i>.
    """
    per_thread = nodes * cores
    built = []
    for n in range(nodes):
        cpus = []
        for c in range(cores):
            core = n * cores + c
            ids = frozenset(core + t * per_thread for t in range(threads))
            cpus.extend(Cpu(id=i, core=core, socket=n, siblings=ids) for i in sorted(ids))
        built.append(Node(id=n, cpus=tuple(sorted(cpus, key=lambda cpu: cpu.id)),
                          memory_mib=memory_mib, hugepages=hugepages))
    devices = tuple(
        Device(address=f"0000:{bus + n:02x}:00.{i}", node=n, vendor="0x8086", product="0x1572")
        for n in range(nodes)
        for i in range(nics_per_node)
    )
    return Host(name=name, nodes=tuple(built), devices=devices, reserved_cpus=reserved_cpus,
                pools=tuple(sorted(set(pools))), labels=labels, state=state)


def make_hosts(count: int, prefix: str = "h", **shape: Any) -> list[Host]:
    """`count` identical hosts named h000, h001, ... (zero-padded so names sort in order)."""
    width = len(str(max(count - 1, 0)))
    return [make_host(f"{prefix}{i:0{width}d}", **shape) for i in range(count)]
