"""Growing or shrinking a placed job where it is: more or fewer cpus and memory on its own
NUMA node of its own host (`vmjob resize`, live vCPU and memory hotplug).

Pure: reads a cluster snapshot, reserves nothing. The new allocation keeps the job's vCPU i on
host cpu i for every vCPU it keeps (a running vCPU is never moved by a resize), adds the
node's lowest free cpus for new vCPUs and drops the last vCPUs when shrinking (hot-unplug
removes the highest-numbered ones).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from placement.cluster import Cluster
from placement.model import Allocation, NodeShare


@dataclass(frozen=True)
class Resize:
    """The job's allocation after the resize, or None with `reason` (one line) why not."""

    allocation: Allocation | None
    reason: str = ""

    @property
    def fits(self) -> bool:
        return self.allocation is not None


def resize(cluster: Cluster, job_id: str, cpus: int, memory_mib: int) -> Resize:
    """`job_id`'s allocation resized to `cpus` cpus and `memory_mib` MiB on the node it uses.

    Only a job on one NUMA node, without hugepages or idle SMT siblings (`threads isolate`),
    can be resized: a guest's NUMA cells and page backing cannot change while it runs. Raises
    UnknownJob for a job the cluster does not hold."""
    before = cluster.allocation_of(job_id)
    if cpus < 1 or memory_mib < 1:
        return Resize(None, "a job keeps at least 1 cpu and some memory")
    if len(before.nodes) != 1:
        return Resize(None, f"it spans NUMA nodes "
                            f"{', '.join(str(s.node) for s in before.nodes)}; only a job on one "
                            "node can be resized")
    if before.hugepage_kib or before.idle_cpus:
        return Resize(None, "its memory is hugepages or it keeps SMT siblings idle "
                            "(--threads isolate); such a job cannot be resized")
    node = before.nodes[0].node
    free_cpus, free_mib = cluster.node_free(before.host, node)
    more_cpus, more_mib = cpus - len(before.cpus), memory_mib - before.memory_mib
    if more_cpus > len(free_cpus):
        return Resize(None, f"node {node} of {before.host} has {len(free_cpus)} free cpus; "
                            f"{more_cpus} more asked")
    if more_mib > free_mib:
        return Resize(None, f"node {node} of {before.host} has {free_mib} MiB free; "
                            f"{more_mib} MiB more asked")
    kept = before.cpus[:cpus]
    chosen = kept + tuple(sorted(free_cpus))[:max(more_cpus, 0)]
    return Resize(replace(before, cpus=chosen, memory_mib=memory_mib,
                          nodes=(NodeShare(node, tuple(sorted(chosen)), memory_mib),)))
