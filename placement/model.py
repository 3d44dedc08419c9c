"""Values the placement engine reasons about: the cluster's hardware and what jobs ask for.

Everything here is an immutable value. The engine's state (who holds what) lives in
`placement.cluster.Cluster`; these types only describe hardware, requests and decisions.
Memory is in MiB throughout; CPU ids are the host's logical CPU ids as libvirt reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class HostState(StrEnum):
    UP = "up"
    CORDONED = "cordoned"  # running jobs stay, nothing new is placed
    DOWN = "down"


class NumaPolicy(StrEnum):
    STRICT = "strict"  # cpus, memory and NICs all on one node
    PREFER = "prefer"  # one node when possible, span nodes otherwise
    ANY = "any"  # span nodes freely


class ThreadPolicy(StrEnum):
    DEDICATED = "dedicated"  # each vCPU gets one host thread to itself
    ISOLATE = "isolate"  # and the SMT siblings of that thread stay idle


@dataclass(frozen=True)
class Cpu:
    id: int
    core: int
    socket: int
    siblings: frozenset[int]  # includes the cpu itself, as libvirt reports it


@dataclass(frozen=True)
class Device:
    address: str  # PCI address, "0000:03:00.0"
    node: int
    kind: str = "nic"
    vendor: str = ""  # "0x8086"
    product: str = ""
    iommu_group: int | None = None  # devices of one group can only go to one guest together
    pf: str | None = None  # SR-IOV: address of the physical function this VF belongs to
    vfs: tuple[str, ...] = ()  # SR-IOV: addresses of this PF's virtual functions


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[Cpu, ...]
    memory_mib: int  # ordinary memory allocatable to jobs: MemTotal - hugepage pools - reserved
    hugepages: tuple[tuple[int, int], ...] = ()  # (page size KiB, pages allocatable)
    distances: tuple[tuple[int, int], ...] = ()  # (node id, ACPI SLIT distance), self is 10

    @property
    def memory_only(self) -> bool:
        """A node with memory and no cpus (CXL, HBM): serves memory only to jobs asking."""
        return not self.cpus


@dataclass(frozen=True)
class Host:
    name: str
    nodes: tuple[Node, ...]
    devices: tuple[Device, ...] = ()
    reserved_cpus: frozenset[int] = frozenset()  # kept for the OS / emulator threads
    labels: tuple[tuple[str, str], ...] = ()
    # the pools it belongs to (sorted, at least one); counted in each: a job for any of them
    # may take it
    pools: tuple[str, ...] = ("default",)
    state: HostState = HostState.UP
    siblings_known: bool = True  # False: libvirt gave no SMT sibling data, so no isolate


@dataclass(frozen=True)
class Request:
    cpus: int
    memory_mib: int
    nics: int = 0
    nic_vendor: str | None = None
    nic_product: str | None = None
    numa: NumaPolicy = NumaPolicy.PREFER
    threads: ThreadPolicy = ThreadPolicy.DEDICATED
    hugepage_kib: int | None = None
    host: str | None = None
    pool: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    anti_affinity: str | None = None  # members of one group go to distinct hosts
    priority: int = 0
    preemptible: bool = False
    mem_nodes: bool = False  # memory-only nodes (CXL, HBM) may supply memory the cpus' nodes lack


@dataclass(frozen=True)
class NodeShare:
    node: int
    cpus: tuple[int, ...]
    memory_mib: int


@dataclass(frozen=True)
class Allocation:
    host: str
    cpus: tuple[int, ...]  # vCPU i runs on host cpu cpus[i]
    memory_mib: int
    nodes: tuple[NodeShare, ...]  # per host NUMA node used: its cpus and memory
    devices: tuple[str, ...] = ()  # NIC i is host PCI device devices[i]
    hugepage_kib: int | None = None
    idle_cpus: tuple[int, ...] = field(default=())  # siblings kept idle by ThreadPolicy.ISOLATE
