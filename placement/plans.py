"""Plans that make room: which jobs to live-migrate or checkpoint so a request fits, and which
migrations free whole NUMA nodes.

Plans are values. The planner proposes and checks them with the same filters `place` uses, on a
copy of the cluster; carrying them out (and reserving on each destination first) is `vmjobs`'s
job. A job can only be moved if it was reserved with its request; it is migrated only if the
request does not pin it to a host, and checkpointed only if it is preemptible and its priority
is not above the request's.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import count

from placement.cluster import Cluster
from placement.filters import HOST_FILTERS, free_nics, units
from placement.fit import fit_host
from placement.ledger import HostLedger, claim, copy_ledger, pages_for
from placement.model import Allocation, HostState, NumaPolicy, Request
from placement.need import Need, need_of
from placement.units import format_mib, plural


@dataclass(frozen=True)
class Migrate:
    job_id: str
    to_host: str
    memory_mib: int = 0  # what moving it costs
    allocation: Allocation | None = None  # where it lands, as planned


@dataclass(frozen=True)
class Checkpoint:
    job_id: str
    memory_mib: int = 0


Action = Migrate | Checkpoint


@dataclass(frozen=True)
class Plan:
    """`found` says whether the goal is met after `actions`, applied in order.

    cost_mib: memory moved (migrated or written to disk). `allocation`: where the request goes
    afterwards (plan_to_fit). `freed`: (host, node) pairs left empty (plan_rebalance).
    `complete` is False when the search stopped at its budget, so a cheaper plan may exist.
    """

    found: bool
    actions: tuple[Action, ...]
    cost_mib: int
    summary: str
    allocation: Allocation | None = None
    freed: tuple[tuple[str, int], ...] = ()
    complete: bool = True


def apply_plan(cluster: Cluster, plan: Plan) -> Cluster:
    """A copy of `cluster` with the plan's actions carried out (the original is untouched)."""
    after = cluster.copy()
    for action in plan.actions:
        request = after.request_of(action.job_id)
        after.release(action.job_id)
        if isinstance(action, Migrate):
            assert request is not None
            alloc = action.allocation
            if alloc is None:
                alloc = after.place(replace(request, host=action.to_host)).allocation
                assert alloc is not None, f"{action.job_id} no longer fits on {action.to_host}"
            after.reserve(action.job_id, alloc, request)
    return after


# --- plan_to_fit --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Held:
    job_id: str
    cost: int
    cpus: int  # cpus it frees on the target (idle siblings included)
    memory: int  # memory units it frees on the target, in the request's units
    nics: int  # NICs it frees on the target that the request accepts


@dataclass(frozen=True)
class _Target:
    """Where the request should fit after evictions: one node of a host, or the whole host."""

    host: str
    node: int | None
    mode: str
    jobs: tuple[_Held, ...]  # evictable jobs touching the target, cheapest first
    free_cpus: int
    free_memory: int
    free_nics: int
    suffix: tuple[tuple[int, int, int, float], ...]  # from i on: cpus, memory, nics, min cost/cpu


def _movable(cluster: Cluster, job_id: str, request: Request) -> bool:
    theirs = cluster.request_of(job_id)
    if theirs is None:
        return False
    return theirs.host is None or (theirs.preemptible and theirs.priority <= request.priority)


def _targets(cluster: Cluster, need: Need) -> list[_Target]:
    request = need.request
    modes = {NumaPolicy.STRICT: ("node",), NumaPolicy.PREFER: ("node", "span"),
             NumaPolicy.ANY: ("either",)}[request.numa]
    targets = []
    for name in cluster.hosts:
        ledger = cluster._ledger(name)
        if any(check(ledger, request) for check in HOST_FILTERS):
            continue
        for mode in modes:
            nodes = [n.shape.id for n in ledger.nodes] if mode == "node" else [None]
            for node in nodes:
                target = _target(cluster, ledger, need, mode, node)
                if target is not None:
                    targets.append(target)
    return targets


def _target(cluster: Cluster, ledger: HostLedger, need: Need, mode: str,
            node: int | None) -> _Target | None:
    request = need.request
    mine = [n for n in ledger.nodes if node is None or n.shape.id == node]
    node_ids = {n.shape.id for n in mine}
    held = []
    for job_id in cluster.jobs_on(ledger.host.name):
        alloc = cluster.allocation_of(job_id)
        shares = [s for s in alloc.nodes if s.node in node_ids]
        idle = [c for c in alloc.idle_cpus if ledger.node_of_cpu[c] in node_ids]
        nics = [a for a in alloc.devices
                if ledger.devices[a].node in node_ids and need.wants(ledger.devices[a])]
        if not (shares or idle or nics) or not _movable(cluster, job_id, request):
            continue
        memory = 0
        if alloc.hugepage_kib == need.page_kib:
            memory = sum(s.memory_mib if need.page_kib is None
                         else pages_for(s.memory_mib, need.page_kib) for s in shares)
        cpus = sum(len(s.cpus) for s in shares) + len(idle)
        held.append(_Held(job_id, alloc.memory_mib, cpus, memory, len(nics)))
    held.sort(key=lambda h: (h.cost, h.job_id))
    suffix = [(0, 0, 0, float("inf"))]
    for h in reversed(held):
        cpus, mem, nics, per_cpu = suffix[-1]
        mine_per_cpu = h.cost / h.cpus if h.cpus else float("inf")
        suffix.append((cpus + h.cpus, mem + h.memory, nics + h.nics, min(per_cpu, mine_per_cpu)))
    suffix.reverse()
    target = _Target(
        host=ledger.host.name,
        node=node,
        mode=mode,
        jobs=tuple(held),
        free_cpus=sum(len(n.free) for n in mine),
        free_memory=sum(units(n, need) for n in mine),
        free_nics=sum(len(free_nics(ledger, n, need)) for n in mine),
        suffix=tuple(suffix),
    )
    if _bound(target, need, 0, 0, 0, 0) is None:
        return None  # even evicting everything movable would not make room
    return target


def _bound(target: _Target, need: Need, start: int, cpus: int, memory: int,
           nics: int) -> float | None:
    """A lower bound on the memory still to move, given what is freed so far and that only jobs
    from index `start` on may be added; None when even all of those would not be enough.

    Admissible and consistent (so the first plan found is the cheapest): a job frees on the
    target at most the memory it moves, and frees cpus at no better than the best cost per cpu
    among the jobs still available.
    """
    short_cpus = need.slots - target.free_cpus - cpus
    short_memory = need.units - target.free_memory - memory
    short_nics = need.nics - target.free_nics - nics
    more_cpus, more_memory, more_nics, per_cpu = target.suffix[start]
    if short_cpus > more_cpus or short_memory > more_memory or short_nics > more_nics:
        return None
    bound = short_cpus * per_cpu if short_cpus > 0 else 0.0
    if short_memory > 0 and need.page_kib is None:
        bound = max(bound, float(short_memory))
    return bound


def _fits_after(cluster: Cluster, target: _Target, need: Need, jobs: Iterable[str]) -> bool:
    ledger = copy_ledger(cluster._ledger(target.host))
    for job_id in jobs:
        request = cluster.request_of(job_id)
        group = request.anti_affinity if request is not None else None
        claim(ledger, cluster.allocation_of(job_id), job_id, -1, group)
    if target.node is not None:
        ledger.nodes = tuple(n for n in ledger.nodes if n.shape.id == target.node)
    return fit_host(ledger, need, target.mode).fits


def _relocate(work: Cluster, away_from: str, request: Request, jobs: Iterable[str],
              policy: str) -> list[Action] | None:
    """Move `jobs` off host `away_from` on `work`, biggest first; None (and `work` as it was)
    when one of them can be neither migrated nor checkpointed."""
    held = {j: (work.allocation_of(j), work.request_of(j)) for j in jobs}
    for job_id in held:
        work.release(job_id)
    actions: list[Action] = []
    for job_id in sorted(held, key=lambda j: (-held[j][0].memory_mib, j)):
        alloc, theirs = held[job_id]
        assert theirs is not None
        placed = None
        if theirs.host is None:
            placed = work.place_within(theirs, policy, exclude=frozenset({away_from})).allocation
        if placed is not None:
            work.reserve(job_id, placed, theirs)
            actions.append(Migrate(job_id, placed.host, alloc.memory_mib, placed))
        elif theirs.preemptible and theirs.priority <= request.priority:
            actions.append(Checkpoint(job_id, alloc.memory_mib))
        else:
            _undo(work, held, actions)
            return None
    return actions


def _undo(work: Cluster, held: dict[str, tuple[Allocation, Request | None]],
          actions: list[Action]) -> None:
    for action in actions:
        if isinstance(action, Migrate):
            work.release(action.job_id)
    for job_id, (alloc, theirs) in held.items():
        work.reserve(job_id, alloc, theirs)


def plan_to_fit(cluster: Cluster, request: Request, *, policy: str = "pack",
                time_budget_s: float | None = 0.05, max_actions: int = 4,
                max_steps: int | None = None) -> Plan:
    """The cheapest migrations / checkpoints after which `request` fits (cost: memory moved).

    Best-first (A*) over sets of jobs to evict from one target (a node for strict, a host
    otherwise), cheapest set first; each candidate set is checked with the real filters, then
    its jobs are re-placed elsewhere with `policy` (or checkpointed). Evicted jobs are not
    themselves made room for. The search stops after `time_budget_s` seconds or `max_steps`
    candidate sets (use the latter for reproducible runs); `Plan.complete` tells which.
    """
    decision = cluster.place(request, policy)
    if decision.fits:
        return Plan(True, (), 0, "fits already; nothing to move", decision.allocation)
    if decision.explanation.never_fits:
        return Plan(False, (), 0, decision.explanation.summary)
    need = need_of(request)
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    order = count()
    heap: list[tuple[float, int, int, int, _Target, tuple[int, ...]]] = []
    for target in _targets(cluster, need):
        bound = _bound(target, need, 0, 0, 0, 0)
        assert bound is not None
        heapq.heappush(heap, (bound, 0, next(order), 0, target, ()))
    work = cluster.copy()
    steps = 0
    while heap:
        steps += 1
        if (deadline is not None and steps % 16 == 0 and time.perf_counter() > deadline) or (
                max_steps is not None and steps > max_steps):
            return Plan(False, (), 0, "no plan found within the search budget", complete=False)
        _, cost, _, _, target, chosen = heapq.heappop(heap)
        jobs = [target.jobs[i].job_id for i in chosen]
        freed = [target.jobs[i] for i in chosen]
        short = _bound(target, need, len(target.jobs), sum(h.cpus for h in freed),
                       sum(h.memory for h in freed), sum(h.nics for h in freed))
        if chosen and short == 0.0 and _fits_after(work, target, need, jobs):
            actions = _relocate(work, target.host, request, jobs, policy)
            if actions is not None:
                placed = work.place(request, policy).allocation
                _undo(work, {j: (cluster.allocation_of(j), cluster.request_of(j))
                             for j in jobs}, actions)
                if placed is not None:
                    moved = sum(a.memory_mib for a in actions)
                    return Plan(True, tuple(actions), moved, _describe(actions, placed), placed)
        if len(chosen) >= max_actions:
            continue
        start = chosen[-1] + 1 if chosen else 0
        for i in range(start, len(target.jobs)):
            more = (*chosen, i)
            picked = [target.jobs[k] for k in more]
            bound = _bound(target, need, i + 1, sum(h.cpus for h in picked),
                           sum(h.memory for h in picked), sum(h.nics for h in picked))
            if bound is None:
                continue
            spent = cost + target.jobs[i].cost
            heapq.heappush(heap, (spent + bound, spent, next(order), len(more), target, more))
    return Plan(False, (), 0, "no set of movable jobs makes room")


def _describe(actions: list[Action], placed: Allocation) -> str:
    moves = sum(isinstance(a, Migrate) for a in actions)
    saves = len(actions) - moves
    parts = []
    if moves:
        parts.append(plural(moves, "migration"))
    if saves:
        parts.append(plural(saves, "checkpoint"))
    moved = format_mib(sum(a.memory_mib for a in actions))
    verb = "makes" if len(actions) == 1 else "make"
    return f"{' and '.join(parts)} ({moved} moved) {verb} room on {placed.host}"


# --- plan_rebalance -----------------------------------------------------------------------


def plan_rebalance(cluster: Cluster, max_moves: int, *, policy: str = "pack",
                   time_budget_s: float | None = 0.5) -> Plan:
    """Migrations, at most `max_moves`, that each leave a whole NUMA node empty.

    Greedy: nodes that are cheapest to empty (least memory to move) go first; their jobs go
    to other hosts, never onto a node that is empty now or freed by the plan. A node is only
    emptied if all of its jobs can move.
    """
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    work = cluster.copy()
    protected = {
        (name, n.shape.id)
        for name in cluster.hosts
        for n in cluster._ledger(name).nodes
        if n.is_empty() and len(n.nics_free) == len(n.shape.nics)
    }
    actions: list[Action] = []
    freed: list[tuple[str, int]] = []
    complete = True
    for host, node in _cheapest_to_empty(cluster):
        if deadline is not None and time.perf_counter() > deadline:
            complete = False
            break
        jobs = _jobs_holding(work, host, node)
        if jobs is None or len(actions) + len(jobs) > max_moves:
            continue
        moved = _move_all(work, host, jobs, policy, frozenset(protected | set(freed)))
        if moved is None:
            continue
        actions.extend(moved)
        freed.append((host, node))
    cost = sum(a.memory_mib for a in actions)
    summary = (f"frees {plural(len(freed), 'NUMA node')} with {plural(len(actions), 'migration')}"
               f" ({format_mib(cost)} moved)" if freed else "no node can be freed within budget")
    return Plan(bool(freed), tuple(actions), cost, summary, freed=tuple(freed), complete=complete)


def _jobs_holding(cluster: Cluster, host: str, node_id: int) -> tuple[str, ...] | None:
    """Jobs holding anything on the node, when all can migrate and they are all it holds."""
    ledger = cluster._ledger(host)
    node = ledger.node(node_id)
    if node is None or node.is_empty() or ledger.host.state != HostState.UP:
        return None
    jobs = tuple(sorted(j for j in cluster.jobs_on(host)
                        if node_id in _nodes_of(ledger, cluster.allocation_of(j))))
    if not jobs or not all(_migratable(cluster, j) for j in jobs):
        return None
    held = sum(1 for j in jobs
               for c in (*cluster.allocation_of(j).cpus, *cluster.allocation_of(j).idle_cpus)
               if ledger.node_of_cpu[c] == node_id)
    if held != len(node.shape.cpus) - len(node.free):
        return None  # something reserved without a request holds cpus here
    return jobs


def _cheapest_to_empty(cluster: Cluster) -> list[tuple[str, int]]:
    """Used nodes that could be emptied, least memory to move first."""
    found = []
    for host in cluster.hosts:
        for node in cluster._ledger(host).nodes:
            jobs = _jobs_holding(cluster, host, node.shape.id)
            if jobs is not None:
                cost = sum(cluster.allocation_of(j).memory_mib for j in jobs)
                found.append((cost, len(jobs), host, node.shape.id))
    found.sort()
    return [(host, node) for _, _, host, node in found]


def _nodes_of(ledger: HostLedger, alloc: Allocation) -> set[int]:
    nodes = {s.node for s in alloc.nodes}
    nodes.update(ledger.node_of_cpu[c] for c in alloc.idle_cpus)
    nodes.update(ledger.devices[a].node for a in alloc.devices)
    return nodes


def _migratable(cluster: Cluster, job_id: str) -> bool:
    request = cluster.request_of(job_id)
    return request is not None and request.host is None


def _move_all(work: Cluster, host: str, jobs: tuple[str, ...], policy: str,
              avoid: frozenset[tuple[str, int]]) -> list[Action] | None:
    held = {j: (work.allocation_of(j), work.request_of(j)) for j in jobs}
    for job_id in jobs:
        work.release(job_id)
    actions: list[Action] = []
    for job_id in sorted(jobs, key=lambda j: (-held[j][0].memory_mib, j)):
        alloc, theirs = held[job_id]
        assert theirs is not None
        placed = work.place_within(theirs, policy, exclude=frozenset({host}),
                                   avoid=avoid).allocation
        if placed is None:
            _undo(work, held, actions)
            return None
        work.reserve(job_id, placed, theirs)
        actions.append(Migrate(job_id, placed.host, alloc.memory_mib, placed))
    return actions
