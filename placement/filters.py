"""Filters: small functions that say why a host (or one of its NUMA nodes) cannot take a request.

Every filter returns the reasons it rejects; an empty tuple means it passes. Host filters look
at the host as a whole; node filters at one NUMA node; span filters at the free capacity of all
nodes together (for requests allowed to span nodes). Filters only read the ledger they are
handed, so planners can run them over a modified copy.
"""

from __future__ import annotations

from collections.abc import Callable

from placement.ledger import HostLedger, NodeLedger, nic_busy_text, sriov_related
from placement.model import HostState, Request, ThreadPolicy
from placement.need import Need
from placement.results import Reason
from placement.units import format_mib, format_page, plural

HostFilter = Callable[[HostLedger, Request], tuple[Reason, ...]]
NodeFilter = Callable[[HostLedger, NodeLedger, Need], tuple[Reason, ...]]
SpanFilter = Callable[[HostLedger, Need], tuple[Reason, ...]]

PASS: tuple[Reason, ...] = ()


# --- host filters -------------------------------------------------------------------------


def host_name(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    name = ledger.host.name
    if request.host is None or request.host == name:
        return PASS
    return (Reason(name, None, f"{name}: not host {request.host}", "host"),)


def host_state(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    state = ledger.host.state
    if state == HostState.UP:
        return PASS
    return (Reason(ledger.host.name, None, f"{ledger.host.name}: {state.value}", "state"),)


def pool(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    if request.pool is None or request.pool in ledger.host.pools:
        return PASS
    name = ledger.host.name
    return (Reason(name, None, f"{name}: not in pool {request.pool}", "pool"),)


def labels(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    have = ledger.labels
    missing = [f"{k}={v}" for k, v in request.labels if have.get(k) != v]
    if not missing:
        return PASS
    name = ledger.host.name
    return (Reason(name, None, f"{name}: lacks label {', '.join(missing)}", "labels"),)


def anti_affinity(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    group = request.anti_affinity
    if group is None or not ledger.groups.get(group):
        return PASS
    name = ledger.host.name
    return (Reason(name, None, f"{name}: already runs a member of group {group}",
                   "anti_affinity"),)


def threads(ledger: HostLedger, request: Request) -> tuple[Reason, ...]:
    """`isolate` keeps a vCPU's SMT siblings idle: impossible to promise without sibling data."""
    if request.threads != ThreadPolicy.ISOLATE or ledger.host.siblings_known:
        return PASS
    name = ledger.host.name
    return (Reason(name, None, f"{name}: libvirt reports no SMT sibling data, so "
                   "--threads isolate cannot keep siblings idle", "threads"),)


# Filters that hold whatever else runs: a request failing them on every host never fits.
STATIC_HOST_FILTERS: tuple[HostFilter, ...] = (host_name, pool, labels, threads)
HOST_FILTERS: tuple[HostFilter, ...] = (host_name, host_state, pool, labels, threads,
                                        anti_affinity)


# --- capacity as the filters count it -------------------------------------------------------


def slots(node: NodeLedger, need: Need) -> int:
    return node.free_whole_cores if need.isolate else len(node.free)


def units(node: NodeLedger, need: Need) -> int:
    """Free memory units of `node` for `need`; a memory-only node's count only when asked for."""
    if not node.shape.cpus and not need.request.mem_nodes:
        return 0
    if need.page_kib is None:
        return node.memory_free
    return node.pages_free.get(need.page_kib, 0)


def free_nics(ledger: HostLedger, node: NodeLedger, need: Need) -> list[str]:
    """Free NICs on `node` the request accepts, in address order, never an SR-IOV PF together
    with one of its VFs (the first in address order is kept)."""
    if not need.nics:
        return []
    return compatible(ledger, sorted(a for a in node.nics_free
                                     if need.wants(ledger.devices[a])))


def compatible(ledger: HostLedger, addresses: list[str]) -> list[str]:
    """`addresses` (in their order) less any SR-IOV PF or VF of a NIC kept. VFs and plain NICs
    are kept before PFs: a PF excludes all its VFs, a VF only its PF."""
    kept: list[str] = []
    for address in sorted(addresses, key=lambda a: bool(ledger.devices[a].vfs)):
        device = ledger.devices[address]
        if not any(sriov_related(device, ledger.devices[k]) for k in kept):
            kept.append(address)
    return [a for a in addresses if a in kept]


def busy_nics_text(ledger: HostLedger, busy: list[str]) -> str:
    """"NICs a, b in use" for held NICs, one clause per NIC a held partner keeps from jobs."""
    held = [a for a in busy if a in ledger.nic_holders]
    blocked = [a for a in busy if a not in ledger.nic_holders]
    parts = []
    if held:
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        parts.append(f"{'NIC' if len(held) == 1 else 'NICs'} {listed} in use")
    parts.extend(f"NIC {a} {nic_busy_text(ledger, a)}" for a in blocked[:3])
    return "; ".join(parts) or "its free NICs are SR-IOV PFs and VFs of each other"


def _cores_text(count: int, need: Need) -> str:
    return plural(count, "free whole core" if need.isolate else "free core")


def _memory_text(count: int, need: Need) -> str:
    if need.page_kib is None:
        return f"{format_mib(count)} free memory"
    return f"{plural(count, 'free ' + format_page(need.page_kib) + ' hugepage')}"


def _needs_memory(need: Need) -> str:
    return format_mib(need.units) if need.page_kib is None else str(need.units)


# --- node filters ---------------------------------------------------------------------------


def node_cpus(ledger: HostLedger, node: NodeLedger, need: Need) -> tuple[Reason, ...]:
    have = slots(node, need)
    if have >= need.slots:
        return PASS
    where = f"{ledger.host.name}/node{node.shape.id}"
    return (Reason(ledger.host.name, node.shape.id,
                   f"{where}: {_cores_text(have, need)}, needs {need.slots}", "cpus"),)


def node_memory(ledger: HostLedger, node: NodeLedger, need: Need) -> tuple[Reason, ...]:
    have = units(node, need)
    if have >= need.units:
        return PASS
    where = f"{ledger.host.name}/node{node.shape.id}"
    if need.page_kib is not None and need.page_kib not in node.shape.hugepages:
        message = f"{where}: no {format_page(need.page_kib)} hugepages"
        return (Reason(ledger.host.name, node.shape.id, message, "hugepages"),)
    kind = "memory" if need.page_kib is None else "hugepages"
    message = f"{where}: {_memory_text(have, need)}, needs {_needs_memory(need)}"
    return (Reason(ledger.host.name, node.shape.id, message, kind),)


def node_nics(ledger: HostLedger, node: NodeLedger, need: Need) -> tuple[Reason, ...]:
    if not need.nics or len(free_nics(ledger, node, need)) >= need.nics:
        return PASS
    where = f"{ledger.host.name}/node{node.shape.id}"
    wanted = [a for a in node.shape.nics if need.wants(ledger.devices[a])]
    if len(wanted) >= need.nics:
        busy = [a for a in wanted if a not in node.nics_free]
        message = f"{where}: {busy_nics_text(ledger, busy)}"
    else:
        count = plural(len(wanted), "NIC") if wanted else "no NICs"
        message = f"{where}: {count}{need.nic_filter_text()}, needs {need.nics}"
    return (Reason(ledger.host.name, node.shape.id, message, "nics"),)


NODE_FILTERS: tuple[NodeFilter, ...] = (node_cpus, node_memory, node_nics)


# --- span filters (the host's nodes taken together) -----------------------------------------


def span_cpus(ledger: HostLedger, need: Need) -> tuple[Reason, ...]:
    have = sum(slots(n, need) for n in ledger.nodes)
    if have >= need.slots:
        return PASS
    name = ledger.host.name
    return (Reason(name, None, f"{name}: {_cores_text(have, need)}, needs {need.slots}", "cpus"),)


def span_memory(ledger: HostLedger, need: Need) -> tuple[Reason, ...]:
    have = sum(units(n, need) for n in ledger.nodes)
    if have >= need.units:
        return PASS
    name = ledger.host.name
    if need.page_kib is not None and all(need.page_kib not in n.shape.hugepages
                                         for n in ledger.nodes):
        return (Reason(name, None, f"{name}: no {format_page(need.page_kib)} hugepages",
                       "hugepages"),)
    kind = "memory" if need.page_kib is None else "hugepages"
    message = f"{name}: {_memory_text(have, need)}, needs {_needs_memory(need)}"
    return (Reason(name, None, message, kind),)


def span_nics(ledger: HostLedger, need: Need) -> tuple[Reason, ...]:
    if not need.nics:
        return PASS
    have = sum(len(free_nics(ledger, n, need)) for n in ledger.nodes)
    if have >= need.nics:
        return PASS
    name = ledger.host.name
    wanted = [a for n in ledger.nodes for a in n.shape.nics if need.wants(ledger.devices[a])]
    if len(wanted) >= need.nics:
        busy = [a for n in ledger.nodes for a in n.shape.nics
                if a not in n.nics_free and need.wants(ledger.devices[a])]
        message = f"{name}: {busy_nics_text(ledger, busy)}"
    else:
        count = plural(len(wanted), "NIC") if wanted else "no NICs"
        message = f"{name}: {count}{need.nic_filter_text()}, needs {need.nics}"
    return (Reason(name, None, message, "nics"),)


SPAN_FILTERS: tuple[SpanFilter, ...] = (span_cpus, span_memory, span_nics)
