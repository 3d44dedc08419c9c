"""Who holds what on one host: the mutable bookkeeping behind `Cluster`.

A host's hardware is split into a static *shape* (built once, shared by every copy of the
cluster) and a small mutable *ledger* of what is free. `claim` moves an allocation into or out of
the ledger; it is one function with a sign so that release is exactly the inverse of reserve.
Only `Cluster` mutates ledgers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from placement.errors import Conflict
from placement.model import Allocation, Device, Host, Node

NIC = "nic"


@dataclass(frozen=True)
class NodeShape:
    """What a NUMA node offers jobs, after the host's OS reservation is taken out."""

    id: int
    cpus: frozenset[int]  # usable: not reserved for the OS
    cores: tuple[tuple[int, ...], ...]  # usable threads of each core, cores in id order
    core_of: Mapping[int, int]  # usable cpu -> index into `cores`
    whole: tuple[bool, ...]  # per core: no thread reserved, so it can host an isolated vCPU
    memory_mib: int
    hugepages: Mapping[int, int]  # page size KiB -> pages
    nics: tuple[str, ...]  # addresses of this node's NICs, sorted
    distances: Mapping[int, int] = field(default_factory=dict)  # node -> SLIT distance; {}: unknown


@dataclass
class NodeLedger:
    shape: NodeShape
    free: set[int]
    free_whole_cores: int
    memory_free: int
    pages_free: dict[int, int]
    nics_free: set[str]

    def is_empty(self) -> bool:
        return len(self.free) == len(self.shape.cpus) and self.memory_free == self.shape.memory_mib


@dataclass
class HostLedger:
    host: Host
    nodes: tuple[NodeLedger, ...]  # in node id order
    node_of_cpu: Mapping[int, int]  # every cpu of the host, reserved ones included
    devices: Mapping[str, Device]  # NICs only: nothing else is ever handed to a job
    labels: Mapping[str, str]
    cpu_holders: dict[int, str] = field(default_factory=dict)  # cpu -> job holding it
    nic_holders: dict[str, str] = field(default_factory=dict)  # NIC address -> job holding it
    # NIC address -> the host's other NICs that may not go to another job while it is held:
    # functions of one IOMMU group, and an SR-IOV PF with its VFs (see `nic_partners`).
    partners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    blocked: Counter[str] = field(default_factory=Counter)  # NIC -> held partners
    groups: Counter[str] = field(default_factory=Counter)  # anti-affinity group -> members here
    jobs: int = 0

    def node(self, node_id: int) -> NodeLedger | None:
        for node in self.nodes:
            if node.shape.id == node_id:
                return node
        return None

    @property
    def free_cpus(self) -> int:
        return sum(len(n.free) for n in self.nodes)

    @property
    def max_node_free(self) -> int:
        return max((len(n.free) for n in self.nodes), default=0)


def _shape(node: Node, reserved: frozenset[int], nics: tuple[str, ...]) -> NodeShape:
    ids = {c.id for c in node.cpus}
    by_core: dict[frozenset[int], list[int]] = {}
    for cpu in node.cpus:
        # Siblings outside this node would be a firmware oddity; keep the core local.
        by_core.setdefault(frozenset(cpu.siblings & ids) | {cpu.id}, []).append(cpu.id)
    cores: list[tuple[int, ...]] = []
    whole: list[bool] = []
    for siblings in sorted(by_core, key=min):
        usable = tuple(sorted(siblings - reserved))
        if usable:
            cores.append(usable)
            whole.append(not siblings & reserved)
    core_of = {cpu: i for i, core in enumerate(cores) for cpu in core}
    return NodeShape(
        id=node.id,
        distances=MappingProxyType(dict(node.distances)),
        cpus=frozenset(core_of),
        cores=tuple(cores),
        core_of=MappingProxyType(core_of),
        whole=tuple(whole),
        memory_mib=node.memory_mib,
        hugepages=MappingProxyType(dict(node.hugepages)),
        nics=nics,
    )


def _whole_free(node: NodeLedger, core: int) -> bool:
    return node.shape.whole[core] and all(c in node.free for c in node.shape.cores[core])


def sriov_related(a: Device, b: Device) -> bool:
    """Whether one of the two is the SR-IOV physical function of the other."""
    return a.pf == b.address or b.pf == a.address or a.address in b.vfs or b.address in a.vfs


def nic_partners(devices: Mapping[str, Device]) -> dict[str, tuple[str, ...]]:
    """For each NIC, the NICs that must not go to another job while it is held.

    VFIO assigns a whole IOMMU group to one guest, so functions sharing a group go to one job
    or stay free; an SR-IOV PF cannot be passed through while its VFs are in use (unbinding it
    destroys them), nor a VF while its PF is (the PF's driver is gone). Source: the kernel's
    Documentation/driver-api/vfio.rst ("Groups, Devices, and IOMMUs").
    """
    partners: dict[str, tuple[str, ...]] = {}
    for address, device in devices.items():
        partners[address] = tuple(sorted(
            other.address for other in devices.values()
            if other.address != address and (
                (device.iommu_group is not None and other.iommu_group == device.iommu_group)
                or sriov_related(device, other))
        ))
    return partners


def empty_ledger(host: Host) -> HostLedger:
    nics = {d.address: d for d in host.devices if d.kind == NIC}
    nodes = []
    for node in sorted(host.nodes, key=lambda n: n.id):
        node_nics = tuple(sorted(a for a, d in nics.items() if d.node == node.id))
        shape = _shape(node, host.reserved_cpus, node_nics)
        ledger = NodeLedger(
            shape=shape,
            free=set(shape.cpus),
            free_whole_cores=0,
            memory_free=node.memory_mib,
            pages_free=dict(node.hugepages),
            nics_free=set(node_nics),
        )
        ledger.free_whole_cores = sum(_whole_free(ledger, i) for i in range(len(shape.cores)))
        nodes.append(ledger)
    return HostLedger(
        host=host,
        nodes=tuple(nodes),
        node_of_cpu=MappingProxyType({c.id: n.id for n in host.nodes for c in n.cpus}),
        devices=MappingProxyType(nics),
        labels=MappingProxyType(dict(host.labels)),
        partners=MappingProxyType(nic_partners(nics)),
    )


def copy_ledger(ledger: HostLedger) -> HostLedger:
    return HostLedger(
        host=ledger.host,
        nodes=tuple(
            NodeLedger(n.shape, set(n.free), n.free_whole_cores, n.memory_free,
                       dict(n.pages_free), set(n.nics_free))
            for n in ledger.nodes
        ),
        node_of_cpu=ledger.node_of_cpu,
        devices=ledger.devices,
        labels=ledger.labels,
        cpu_holders=dict(ledger.cpu_holders),
        nic_holders=dict(ledger.nic_holders),
        partners=ledger.partners,
        blocked=Counter(ledger.blocked),
        groups=Counter(ledger.groups),
        jobs=ledger.jobs,
    )


def pages_for(memory_mib: int, page_kib: int) -> int:
    return -(-memory_mib * 1024 // page_kib)


def _conflicts(ledger: HostLedger, alloc: Allocation) -> list[str]:
    """Everything wrong with holding `alloc` on this ledger now; empty when it can be held."""
    name = ledger.host.name
    problems: list[str] = []
    shared = [c for s in alloc.nodes for c in s.cpus]
    if sorted(shared) != sorted(alloc.cpus):
        problems.append("its per-node cpus do not match its vCPU pinning")
    seen: set[int] = set()
    for cpu in [*shared, *alloc.idle_cpus]:
        if cpu in seen:
            problems.append(f"cpu {cpu} appears twice")
        seen.add(cpu)
    if len({s.node for s in alloc.nodes}) != len(alloc.nodes):
        problems.append("a NUMA node appears twice")
    checks: list[tuple[NodeLedger, int]] = []
    for share in alloc.nodes:
        node = ledger.node(share.node)
        if node is None:
            problems.append(f"host {name} has no NUMA node {share.node}")
            continue
        checks.extend((node, cpu) for cpu in share.cpus)
        if alloc.hugepage_kib:
            size = alloc.hugepage_kib
            pages = pages_for(share.memory_mib, size)
            have = node.pages_free.get(size)
            if have is None:
                problems.append(f"{name}/node{share.node} has no {size} KiB hugepages")
            elif pages > have:
                problems.append(
                    f"{name}/node{share.node} has {have} free {size} KiB hugepages, "
                    f"the allocation takes {pages}"
                )
        elif share.memory_mib > node.memory_free:
            problems.append(
                f"{name}/node{share.node} has {node.memory_free} MiB free, "
                f"the allocation takes {share.memory_mib}"
            )
        if share.memory_mib < 0:
            problems.append(f"negative memory on node {share.node}")
    for cpu in alloc.idle_cpus:
        node_id = ledger.node_of_cpu.get(cpu)
        node = ledger.node(node_id) if node_id is not None else None
        if node is None:
            problems.append(f"idle cpu {cpu} does not exist on host {name}")
        else:
            checks.append((node, cpu))
    problems.extend(_cpu_problems(ledger, checks))
    if len(set(alloc.devices)) != len(alloc.devices):
        problems.append("a device appears twice")
    for address in alloc.devices:
        device = ledger.devices.get(address)
        if device is None:
            problems.append(f"NIC {address} does not exist on host {name}")
            continue
        node = ledger.node(device.node)
        if node is None or address not in node.nics_free:
            problems.append(f"NIC {address} on {name} {nic_busy_text(ledger, address)}")
        for other in alloc.devices:
            if other > address and other in ledger.devices and sriov_related(
                    device, ledger.devices[other]):
                problems.append(f"NICs {address} and {other} are an SR-IOV PF and its VF")
    return problems


def nic_busy_text(ledger: HostLedger, address: str) -> str:
    """Why a NIC of this host is not free: "is held by job X", "shares IOMMU group 12 with a NIC
    held by job X", "is a VF of 0000:3b:00.0, held by job X", "has VF ... held by job X"."""
    holder = ledger.nic_holders.get(address)
    if holder is not None:
        return f"is held by job {holder}"
    device = ledger.devices[address]
    for other in ledger.partners.get(address, ()):
        job = ledger.nic_holders.get(other)
        if job is None:
            continue
        mate = ledger.devices[other]
        if device.iommu_group is not None and mate.iommu_group == device.iommu_group:
            return f"shares IOMMU group {device.iommu_group} with a NIC held by job {job}"
        if device.pf == other:
            return f"is a VF of {other}, held by job {job}"
        return f"has VF {other} held by job {job}"
    return "is not free"


def _cpu_problems(ledger: HostLedger, checks: list[tuple[NodeLedger, int]]) -> list[str]:
    """Why these (node, cpu) pairs cannot be taken, held cpus grouped by the job holding them."""
    name = ledger.host.name
    held: dict[str, list[int]] = {}
    problems: list[str] = []
    for node, cpu in checks:
        if cpu in node.free:
            continue
        if cpu in node.shape.cpus:
            held.setdefault(ledger.cpu_holders.get(cpu, "?"), []).append(cpu)
        elif cpu in ledger.host.reserved_cpus:
            problems.append(f"cpu {cpu} on {name} is reserved for the host")
        else:
            problems.append(f"cpu {cpu} is not on {name}/node{node.shape.id}")
    for job, cpus in held.items():
        listed = ", ".join(map(str, cpus))
        if len(cpus) == 1:
            problems.append(f"cpu {listed} on {name} is held by job {job}")
        else:
            problems.append(f"cpus {listed} on {name} are held by job {job}")
    return problems


def claim(ledger: HostLedger, alloc: Allocation, job_id: str, sign: int,
          group: str | None = None) -> None:
    """Take (`sign` = 1) or give back (`sign` = -1) everything `alloc` holds.

    Taking checks everything first and raises `Conflict` without touching the ledger; giving
    back trusts that the allocation was taken earlier by the same ledger.
    """
    if sign > 0:
        problems = _conflicts(ledger, alloc)
        if problems:
            raise Conflict(f"job {job_id} on {ledger.host.name}: " + "; ".join(problems))
    cpus_by_node: dict[int, list[int]] = {s.node: list(s.cpus) for s in alloc.nodes}
    for cpu in alloc.idle_cpus:
        cpus_by_node.setdefault(ledger.node_of_cpu[cpu], []).append(cpu)
    for node_id, cpus in cpus_by_node.items():
        node = ledger.node(node_id)
        assert node is not None
        touched = {node.shape.core_of[c] for c in cpus}
        before = sum(_whole_free(node, core) for core in touched)
        if sign > 0:
            node.free.difference_update(cpus)
            for cpu in cpus:
                ledger.cpu_holders[cpu] = job_id
        else:
            node.free.update(cpus)
            for cpu in cpus:
                ledger.cpu_holders.pop(cpu, None)
        node.free_whole_cores += sum(_whole_free(node, core) for core in touched) - before
    for share in alloc.nodes:
        node = ledger.node(share.node)
        assert node is not None
        if alloc.hugepage_kib:
            node.pages_free[alloc.hugepage_kib] -= sign * pages_for(share.memory_mib,
                                                                    alloc.hugepage_kib)
        else:
            node.memory_free -= sign * share.memory_mib
    touched_nics: set[str] = set(alloc.devices)
    for address in alloc.devices:
        if sign > 0:
            ledger.nic_holders[address] = job_id
        else:
            ledger.nic_holders.pop(address, None)
        for other in ledger.partners.get(address, ()):
            ledger.blocked[other] += sign
            if ledger.blocked[other] <= 0:
                del ledger.blocked[other]
            touched_nics.add(other)
    # Free means: held by nobody, and no partner (group mate, PF or VF) held by anybody.
    for address in touched_nics:
        node = ledger.node(ledger.devices[address].node)
        assert node is not None
        if address in ledger.nic_holders or ledger.blocked.get(address, 0) > 0:
            node.nics_free.discard(address)
        else:
            node.nics_free.add(address)
    if group is not None:
        ledger.groups[group] += sign
        if ledger.groups[group] <= 0:
            del ledger.groups[group]
    ledger.jobs += sign
