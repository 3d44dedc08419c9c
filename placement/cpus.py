"""Which host cpus of one NUMA node a job gets: deterministic and compact.

Dedicated vCPUs fill whole cores first (a job's vCPUs share cores with each other, not with other
jobs), and an odd remainder goes into a core another job already half uses, so whole cores stay
free for jobs that need them (`isolate`). Isolated vCPUs each take the first thread of a wholly
free core and leave its siblings idle.
"""

from __future__ import annotations

from placement.ledger import NodeLedger


def pick_dedicated(node: NodeLedger, count: int) -> tuple[int, ...]:
    free = node.free
    whole: list[tuple[int, ...]] = []
    partial: list[tuple[int, ...]] = []
    for core in node.shape.cores:
        threads = tuple(c for c in core if c in free)
        if threads:
            (whole if len(threads) == len(core) else partial).append(threads)
    chosen: list[int] = []
    left: list[tuple[int, ...]] = []
    for threads in whole:
        if len(threads) <= count - len(chosen):
            chosen.extend(threads)
        else:
            left.append(threads)
    for threads in partial + left:
        if len(chosen) == count:
            break
        chosen.extend(threads[: count - len(chosen)])
    if len(chosen) < count:
        raise ValueError(f"node {node.shape.id} has {len(chosen)} free cpus, asked for {count}")
    return tuple(chosen)


def pick_isolated(node: NodeLedger, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(cpus for the vCPUs, sibling cpus kept idle)."""
    cpus: list[int] = []
    idle: list[int] = []
    shape = node.shape
    for index, core in enumerate(shape.cores):
        if len(cpus) == count:
            break
        if shape.whole[index] and all(c in node.free for c in core):
            cpus.append(core[0])
            idle.extend(core[1:])
    if len(cpus) < count:
        raise ValueError(f"node {shape.id} has {len(cpus)} free whole cores, asked for {count}")
    return tuple(cpus), tuple(idle)
