"""`Cluster`: who holds what, and the search that places a request (filter -> score -> choose).

The only stateful object of the engine. `place` never changes anything: the caller decides,
then `reserve`s the allocation (possibly on another snapshot, after checking its own store).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType

from placement import explain as explaining
from placement.cpus import pick_dedicated, pick_isolated
from placement.errors import Conflict, UnknownHost, UnknownJob
from placement.filters import STATIC_HOST_FILTERS
from placement.fit import Option, fit_host
from placement.index import Buckets
from placement.ledger import HostLedger, claim, copy_ledger, empty_ledger, nic_busy_text
from placement.model import (
    Allocation,
    Host,
    HostState,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
)
from placement.need import Need, need_of
from placement.results import Decision, Explanation, HostUsage, NicUsage, NodeUsage
from placement.scorers import POLICIES, Policy, score

# How each NUMA policy searches: one pass per mode, in order (see placement.fit).
MODES: dict[NumaPolicy, tuple[str, ...]] = {
    NumaPolicy.STRICT: ("node",),
    NumaPolicy.PREFER: ("node", "span"),
    NumaPolicy.ANY: ("either",),
}
# The mode whose per-host verdict is "fits under any pass": what explain evaluates.
EXPLAIN_MODE: dict[NumaPolicy, str] = {
    NumaPolicy.STRICT: "node",
    NumaPolicy.PREFER: "either",
    NumaPolicy.ANY: "either",
}


class Cluster:
    """Hosts, what every job holds on them, and placement over that state.

    Invariant: every cpu, idle sibling, NIC, MiB and hugepage is held by at most one job, and
    the free-capacity index agrees with the ledgers. Hosts keep the order they were given in
    ("host order": firstfit and tie-breaks follow it).
    """

    def __init__(self, hosts: Iterable[Host]) -> None:
        given = list(hosts)
        names = [h.name for h in given]
        if len(set(names)) != len(names):
            raise ValueError(f"host names repeat: {sorted(n for n in names if names.count(n) > 1)}")
        self._names = names
        self._id = {name: i for i, name in enumerate(names)}
        self._ledgers = [empty_ledger(h) for h in given]
        # Never mutated, so copies share them: "could it fit on the empty cluster?"
        self._empty = tuple(empty_ledger(h) for h in given)
        self._hosts = {h.name: h for h in given}
        self._pools = tuple(sorted({p for h in given for p in h.pools}))
        self._allocs: dict[str, Allocation] = {}
        self._requests: dict[str, Request | None] = {}
        self._jobs_on: list[set[str]] = [set() for _ in given]
        # Copy-on-write: the hosts whose ledger (and jobs_on set) this cluster alone holds and
        # may change in place. `copy()` shares the others with the clone, so a copy costs
        # O(hosts) pointers, not O(hosts x cpus); the first change to a shared host copies it.
        self._owned: set[int] = set(range(len(given)))
        size = max((sum(len(n.shape.cpus) for n in led.nodes) for led in self._ledgers),
                   default=0)
        self._by_node = Buckets(size, len(given))
        self._by_host = Buckets(size, len(given))
        for i in range(len(given)):
            self._reindex(i)

    # --- state ------------------------------------------------------------------------------

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    def allocations(self) -> Mapping[str, Allocation]:
        return MappingProxyType(dict(self._allocs))

    def request_of(self, job_id: str) -> Request | None:
        """The request a held job was reserved with (None when reserved without one)."""
        if job_id not in self._allocs:
            raise UnknownJob(job_id)
        return self._requests[job_id]

    def allocation_of(self, job_id: str) -> Allocation:
        if job_id not in self._allocs:
            raise UnknownJob(job_id)
        return self._allocs[job_id]

    def jobs_on(self, host: str) -> tuple[str, ...]:
        return tuple(sorted(self._jobs_on[self._host_id(host)]))

    def reserve(self, job_id: str, allocation: Allocation, request: Request | None = None) -> None:
        """Hold `allocation` for `job_id`; all or nothing.

        Raises Conflict if the job already holds something, or if any cpu, idle sibling, NIC,
        memory or hugepage of the allocation is held or does not exist. The request lets
        planners re-place the job elsewhere; jobs reserved without one are never moved.
        """
        if job_id in self._allocs:
            held = self._allocs[job_id].host
            raise Conflict(f"job {job_id} already holds an allocation on {held}")
        i = self._id.get(allocation.host)
        if i is None:
            raise Conflict(f"job {job_id}: unknown host {allocation.host!r}")
        group = request.anti_affinity if request is not None else None
        claim(self._writable(i), allocation, job_id, +1, group)
        self._allocs[job_id] = allocation
        self._requests[job_id] = request
        self._jobs_on[i].add(job_id)
        self._reindex(i)

    def release(self, job_id: str) -> Allocation:
        """Give back everything `job_id` holds; raises UnknownJob if it holds nothing."""
        if job_id not in self._allocs:
            raise UnknownJob(job_id)
        alloc = self._allocs.pop(job_id)
        request = self._requests.pop(job_id)
        i = self._id[alloc.host]
        group = request.anti_affinity if request is not None else None
        claim(self._writable(i), alloc, job_id, -1, group)
        self._jobs_on[i].discard(job_id)
        self._reindex(i)
        return alloc

    def set_state(self, host: str, state: HostState) -> None:
        """Up, cordoned or down. Jobs already held stay held; only up hosts get new ones."""
        i = self._host_id(host)
        ledger = self._writable(i)
        ledger.host = replace(ledger.host, state=state)
        self._hosts[host] = ledger.host
        self._reindex(i)

    def copy(self) -> Cluster:
        """An independent snapshot: changes to either never show in the other.

        Copy-on-write: both share every host's ledger until one of them changes that host,
        which then copies it (`_writable`). O(hosts + jobs) pointers, not O(hosts x cpus):
        at 5,000 hosts of 64 cpus a deep copy took ~225 ms here, more than a pass may cost."""
        clone = Cluster.__new__(Cluster)
        clone._names = self._names
        clone._id = self._id
        clone._ledgers = list(self._ledgers)
        clone._empty = self._empty
        clone._hosts = dict(self._hosts)
        clone._pools = self._pools
        clone._allocs = dict(self._allocs)
        clone._requests = dict(self._requests)
        clone._jobs_on = list(self._jobs_on)
        clone._owned = set()
        self._owned = set()  # what this cluster held alone, it now shares with the clone
        clone._by_node = self._by_node.copy()
        clone._by_host = self._by_host.copy()
        return clone

    def _writable(self, i: int) -> HostLedger:
        """Host i's ledger, copied first (with its set of jobs) if a copy shares it."""
        if i not in self._owned:
            self._ledgers[i] = copy_ledger(self._ledgers[i])
            self._jobs_on[i] = set(self._jobs_on[i])
            self._owned.add(i)
        return self._ledgers[i]

    def free(self, host: str) -> HostUsage:
        ledger = self._ledgers[self._host_id(host)]
        return HostUsage(
            host=host,
            state=ledger.host.state,
            jobs=ledger.jobs,
            nodes=tuple(
                NodeUsage(
                    node=n.shape.id,
                    cpus_free=len(n.free),
                    cpus_total=len(n.shape.cpus),
                    memory_free_mib=n.memory_free,
                    memory_total_mib=n.shape.memory_mib,
                    nics_free=len(n.nics_free),
                    nics_total=len(n.shape.nics),
                    hugepages_free=tuple(sorted(n.pages_free.items())),
                    hugepages_total=tuple(sorted(n.shape.hugepages.items())),
                    nics=tuple(_nic_usage(ledger, a, a in n.nics_free) for a in n.shape.nics),
                )
                for n in ledger.nodes
            ),
        )

    # --- placement --------------------------------------------------------------------------

    def place(self, request: Request, policy: str = "pack") -> Decision:
        """Where `request` would go now under `policy` ("pack", "spread", "firstfit").

        Reserves nothing. When nothing fits, the decision carries `explain(request)`.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        need = need_of(request)
        if need.problem is None and (request.host is None or request.host in self._id):
            found = self._find(need, POLICIES[policy])
            if found is not None:
                option, ledger = found
                return Decision(_allocate(option, ledger, need), explaining.placed(option))
        return Decision(None, self.explain(request))

    def explain(self, request: Request) -> Explanation:
        """Why `request` does or does not fit now, and whether it could ever fit.

        Looks at every host; fits exactly when `place` would succeed.
        """
        need = need_of(request)
        if need.problem is not None:
            return explaining.invalid(need)
        if request.host is not None and request.host not in self._id:
            return explaining.unknown_host(request.host)
        mode = EXPLAIN_MODE[request.numa]
        fits = [fit_host(ledger, need, mode) for ledger in self._ledgers]
        if any(f.fits for f in fits):
            return explaining.fits_now(fits, explaining.all_reasons(
                fits, request.host is not None))
        empty = [(e, fit_host(e, need, mode, STATIC_HOST_FILTERS)) for e in self._empty]
        if any(fit.fits for _, fit in empty):
            return explaining.not_now(need, fits)
        return explaining.never(need, fits, empty, mode)

    def ever_fits(self, request: Request) -> bool:
        """Whether `request` would fit this cluster emptied, with every host up: `not
        explain(request).never_fits`, without the cost of gathering reasons."""
        need = need_of(request)
        if need.problem is not None or (request.host is not None and request.host not in self._id):
            return False
        mode = EXPLAIN_MODE[request.numa]
        return any(fit_host(e, need, mode, STATIC_HOST_FILTERS).fits for e in self._empty)

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool some host is in, sorted."""
        return self._pools

    def candidates(self, request: Request) -> tuple[str, ...]:
        """The hosts `request` could ever use, in host order: those its static filters (host
        name, pool, labels, threads) admit, whatever they hold and whatever their state."""
        if (request.host is None and request.pool is None and not request.labels
                and request.threads != ThreadPolicy.ISOLATE):
            return tuple(self._names)  # nothing to filter on: every host (O(1) per pass)
        return tuple(e.host.name for e in self._empty
                     if not any(f(e, request) for f in STATIC_HOST_FILTERS))

    def place_within(self, request: Request, policy: str = "pack",
                     exclude: frozenset[str] = frozenset(),
                     avoid: frozenset[tuple[str, int]] = frozenset()) -> Decision:
        """`place` for planners: never on hosts in `exclude`, never touching (host, node) pairs
        in `avoid`. Skips the full explanation; a failure says only what was ruled out."""
        need = need_of(request)
        if need.problem is None and (request.host is None or request.host in self._id):
            found = self._find(need, POLICIES[policy], exclude, avoid)
            if found is not None:
                option, ledger = found
                return Decision(_allocate(option, ledger, need), explaining.placed(option))
        ruled_out = f" outside {', '.join(sorted(exclude))}" if exclude else ""
        return Decision(None, Explanation(False, False, (), f"no host{ruled_out} has room"))

    def _ledger(self, host: str) -> HostLedger:
        """The live ledger of `host`, for planners in this package to copy and read."""
        return self._ledgers[self._host_id(host)]

    def _find(self, need: Need, policy: Policy, exclude: frozenset[str] = frozenset(),
              avoid: frozenset[tuple[str, int]] = frozenset(),
              ) -> tuple[Option, HostLedger] | None:
        for mode in MODES[need.request.numa]:
            best: tuple[float, Option, HostLedger] | None = None
            found = 0
            for i in self._candidates(need, mode, policy.order):
                ledger = self._ledgers[i]
                if ledger.host.name in exclude:
                    continue
                fit = fit_host(ledger, need, mode)
                options = fit.options
                if avoid:
                    name = ledger.host.name
                    options = tuple(o for o in options
                                    if not any((name, s[0]) in avoid for s in o.shares))
                if not options:
                    continue
                for option in options:
                    value = score(policy, ledger, need, option)
                    if best is None or value > best[0]:
                        best = (value, option, ledger)
                found += 1
                if found >= policy.sample:
                    break
            if best is not None:
                return best[1], best[2]
        return None

    def _candidates(self, need: Need, mode: str, order: str) -> Iterator[int] | list[int]:
        """Hosts that may fit, in the policy's order; every host left out fails a filter."""
        if need.request.host is not None:
            return [self._id[need.request.host]]
        index = self._by_node if mode == "node" else self._by_host
        if order == "tight":
            return index.ascending(need.slots)
        if order == "loose":
            return index.descending(need.slots)
        return index.at_least(need.slots)

    def _host_id(self, host: str) -> int:
        i = self._id.get(host)
        if i is None:
            raise UnknownHost(host)
        return i

    def _reindex(self, i: int) -> None:
        ledger = self._ledgers[i]
        up = ledger.host.state == HostState.UP
        self._by_node.put(i, ledger.max_node_free if up else None)
        self._by_host.put(i, ledger.free_cpus if up else None)


def _nic_usage(ledger: HostLedger, address: str, free: bool) -> NicUsage:
    device = ledger.devices[address]
    holder = ledger.nic_holders.get(address)
    blocked = "" if free or holder is not None else nic_busy_text(ledger, address)
    return NicUsage(address, device.iommu_group, device.pf, holder, blocked)


def _allocate(option: Option, ledger: HostLedger, need: Need) -> Allocation:
    cpus: list[int] = []
    idle: list[int] = []
    shares: list[NodeShare] = []
    for node_id, count, memory in option.shares:
        node = ledger.node(node_id)
        assert node is not None
        if need.isolate:
            chosen, siblings = pick_isolated(node, count)
            idle.extend(siblings)
        else:
            chosen = pick_dedicated(node, count)
        cpus.extend(chosen)
        mib = memory if need.page_kib is None else memory * need.page_kib // 1024
        shares.append(NodeShare(node=node_id, cpus=chosen, memory_mib=mib))
    return Allocation(
        host=ledger.host.name,
        cpus=tuple(cpus),
        memory_mib=need.request.memory_mib,
        nodes=tuple(shares),
        devices=option.nics,
        hugepage_kib=need.page_kib,
        idle_cpus=tuple(idle),
    )
