"""What the engine answers: decisions, explanations and usage figures (immutable values)."""

from __future__ import annotations

from dataclasses import dataclass

from placement.model import Allocation, HostState


@dataclass(frozen=True)
class Reason:
    """Why one host, or one NUMA node of it, cannot take a request.

    `message` is a whole line meant for people ("a/node0: 2 free cores, needs 4"); `kind` names
    the check that failed ("cpus", "memory", "hugepages", "nics", "state", "pool", "labels",
    "host", "anti_affinity", "numa", "threads", "request") for programs.
    """

    host: str
    node: int | None
    message: str
    kind: str = ""


@dataclass(frozen=True)
class Explanation:
    fits: bool
    never_fits: bool  # would not fit even on the empty cluster with every host up
    reasons: tuple[Reason, ...]
    summary: str  # one line for the user


@dataclass(frozen=True)
class Decision:
    allocation: Allocation | None
    explanation: Explanation

    @property
    def fits(self) -> bool:
        return self.allocation is not None


@dataclass(frozen=True)
class NicUsage:
    """One passthrough NIC: `holder` is the job holding it; `blocked` says why it is not free
    although nobody holds it ("shares IOMMU group 12 with a NIC held by job x"), else ""."""

    address: str
    iommu_group: int | None
    pf: str | None
    holder: str | None
    blocked: str = ""


@dataclass(frozen=True)
class NodeUsage:
    """One NUMA node's capacity. Host cpus reserved for the OS count in neither field.

    cpus_free / cpus_total: logical cpus a job could be given / that jobs can ever be given.
    memory_free_mib / memory_total_mib: ordinary (non-hugepage) memory.
    nics_free / nics_total: passthrough NICs on this node.
    hugepages_free / hugepages_total: (page size KiB, pages) pairs.
    """

    node: int
    cpus_free: int
    cpus_total: int
    memory_free_mib: int
    memory_total_mib: int
    nics_free: int
    nics_total: int
    hugepages_free: tuple[tuple[int, int], ...] = ()
    hugepages_total: tuple[tuple[int, int], ...] = ()
    nics: tuple[NicUsage, ...] = ()  # this node's NICs, in address order


@dataclass(frozen=True)
class HostUsage:
    """A host's capacity per NUMA node (`nodes`) and summed over them (the properties)."""

    host: str
    state: HostState
    jobs: int
    nodes: tuple[NodeUsage, ...]

    @property
    def cpus_free(self) -> int:
        return sum(n.cpus_free for n in self.nodes)

    @property
    def cpus_total(self) -> int:
        return sum(n.cpus_total for n in self.nodes)

    @property
    def memory_free_mib(self) -> int:
        return sum(n.memory_free_mib for n in self.nodes)

    @property
    def memory_total_mib(self) -> int:
        return sum(n.memory_total_mib for n in self.nodes)

    @property
    def nics_free(self) -> int:
        return sum(n.nics_free for n in self.nodes)

    @property
    def nics_total(self) -> int:
        return sum(n.nics_total for n in self.nodes)
