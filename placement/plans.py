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


@dataclass(frozen=True)
class _Pending:
    """A target not built yet; built when the search first reaches it (most never are)."""

    host: str
    node: int | None
    mode: str


def _pending(cluster: Cluster, need: Need) -> list[tuple[float, _Pending]]:
    """Every possible target with a cheap lower bound on the memory moved to make room there.

    The bound takes the lowest memory-per-cpu of any job in the cluster, which no job on the
    target can beat, so best-first search stays exact while it builds only the targets it
    reaches (building one walks every job on its host).
    """
    request = need.request
    modes = {NumaPolicy.STRICT: ("node",), NumaPolicy.PREFER: ("node", "span"),
             NumaPolicy.ANY: ("either",)}[request.numa]
    per_cpu = min((a.memory_mib / (len(a.cpus) + len(a.idle_cpus))
                   for a in cluster.allocations().values()), default=0.0)
    found = []
    for name in cluster.hosts:
        ledger = cluster._ledger(name)
        if not ledger.jobs or any(check(ledger, request) for check in HOST_FILTERS):
            continue
        for mode in modes:
            nodes = [n.shape.id for n in ledger.nodes] if mode == "node" else [None]
            for node in nodes:
                mine = [n for n in ledger.nodes if node is None or n.shape.id == node]
                short_cpus = need.slots - sum(len(n.free) for n in mine)
                bound = max(short_cpus, 0) * per_cpu
                if need.page_kib is None:
                    bound = max(bound, float(need.units - sum(n.memory_free for n in mine)))
                found.append((bound, _Pending(name, node, mode)))
    return found


def _freeable(cluster: Cluster, ledger: HostLedger,
              need: Need) -> list[tuple[str, int, dict[int, tuple[int, int, int]]]]:
    """The host's movable jobs, once per host: (job, memory moved, node -> what it frees there
    as (cpus with idle siblings, memory in the request's units, NICs the request accepts))."""
    request = need.request
    found = []
    for job_id in cluster.jobs_on(ledger.host.name):
        if not _movable(cluster, job_id, request):
            continue
        alloc = cluster.allocation_of(job_id)
        same_units = alloc.hugepage_kib == need.page_kib
        per_node: dict[int, list[int]] = {}
        for share in alloc.nodes:
            memory = 0
            if same_units:
                memory = (share.memory_mib if need.page_kib is None
                          else pages_for(share.memory_mib, need.page_kib))
            per_node[share.node] = [len(share.cpus), memory, 0]
        for cpu in alloc.idle_cpus:
            per_node.setdefault(ledger.node_of_cpu[cpu], [0, 0, 0])[0] += 1
        for address in alloc.devices:
            device = ledger.devices[address]
            if need.wants(device):
                per_node.setdefault(device.node, [0, 0, 0])[2] += 1
        found.append((job_id, alloc.memory_mib,
                      {n: (c, m, k) for n, (c, m, k) in per_node.items()}))
    return found


def _target(ledger: HostLedger, need: Need,
            freeable: list[tuple[str, int, dict[int, tuple[int, int, int]]]], mode: str,
            node: int | None) -> _Target | None:
    mine = [n for n in ledger.nodes if node is None or n.shape.id == node]
    held = []
    for job_id, cost, per_node in freeable:
        cpus = memory = nics = 0
        for node_id, (c, m, k) in per_node.items():
            if node is None or node_id == node:
                cpus += c
                memory += m
                nics += k
        if cpus or memory or nics:
            held.append(_Held(job_id, cost, cpus, memory, nics))
    free_cpus = sum(len(n.free) for n in mine)
    free_memory = sum(units(n, need) for n in mine)
    nics_free = sum(len(free_nics(ledger, n, need)) for n in mine) if need.nics else 0
    if (free_cpus + sum(h.cpus for h in held) < need.slots
            or free_memory + sum(h.memory for h in held) < need.units
            or nics_free + sum(h.nics for h in held) < need.nics):
        return None  # even evicting everything movable would not make room
    held.sort(key=lambda h: (h.cost, h.job_id))
    suffix = [(0, 0, 0, float("inf"))]
    for h in reversed(held):
        cpus, mem, nics, per_cpu = suffix[-1]
        mine_per_cpu = h.cost / h.cpus if h.cpus else float("inf")
        suffix.append((cpus + h.cpus, mem + h.memory, nics + h.nics, min(per_cpu, mine_per_cpu)))
    suffix.reverse()
    return _Target(
        host=ledger.host.name,
        node=node,
        mode=mode,
        jobs=tuple(held),
        free_cpus=free_cpus,
        free_memory=free_memory,
        free_nics=nics_free,
        suffix=tuple(suffix),
    )


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
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    need = need_of(request)
    pending: list[tuple[float, _Pending]] = []
    if need.problem is None:
        # place_within: a failure here needs no explanation yet, and explaining costs a pass
        # over every host twice.
        decision = cluster.place_within(request, policy)
        if decision.fits:
            return Plan(True, (), 0, "fits already; nothing to move", decision.allocation)
        pending = _pending(cluster, need)
    if not cluster.ever_fits(request):
        return Plan(False, (), 0, cluster.explain(request).summary)
    if not pending:
        return Plan(False, (), 0, "no set of movable jobs makes room")
    order = count()
    heap: list[tuple[float, int, int, int, _Target | _Pending, tuple[int, ...]]] = [
        (bound, 0, next(order), 0, target, ()) for bound, target in pending]
    heapq.heapify(heap)
    freeable: dict[str, list[tuple[str, int, dict[int, tuple[int, int, int]]]]] = {}
    work: Cluster | None = None  # copied on first use: most candidate sets fail before it
    steps = 0
    while heap:
        steps += 1
        if (deadline is not None and time.perf_counter() > deadline) or (
                max_steps is not None and steps > max_steps):
            return Plan(False, (), 0, "no plan found within the search budget", complete=False)
        _, cost, _, _, target, chosen = heapq.heappop(heap)
        if isinstance(target, _Pending):
            steps -= 1  # building a target is not a candidate set
            ledger = cluster._ledger(target.host)
            if target.host not in freeable:
                freeable[target.host] = _freeable(cluster, ledger, need)
            built = _target(ledger, need, freeable[target.host], target.mode, target.node)
            if built is not None:
                bound = _bound(built, need, 0, 0, 0, 0)
                assert bound is not None
                heapq.heappush(heap, (bound, 0, next(order), 0, built, ()))
            continue
        jobs = [target.jobs[i].job_id for i in chosen]
        freed = [target.jobs[i] for i in chosen]
        cpus = sum(h.cpus for h in freed)
        memory = sum(h.memory for h in freed)
        nics = sum(h.nics for h in freed)
        short = _bound(target, need, len(target.jobs), cpus, memory, nics)
        if chosen and short == 0.0 and _fits_after(cluster, target, need, jobs):
            work = work or cluster.copy()
            actions = _relocate(work, target.host, request, jobs, policy)
            if actions is not None:
                placed = work.place_within(request, policy).allocation
                _undo(work, {j: (cluster.allocation_of(j), cluster.request_of(j))
                             for j in jobs}, actions)
                if placed is not None:
                    moved = sum(a.memory_mib for a in actions)
                    return Plan(True, tuple(actions), moved, _describe(actions, placed), placed)
        if len(chosen) >= max_actions:
            continue
        start = chosen[-1] + 1 if chosen else 0
        for i in range(start, len(target.jobs)):
            job = target.jobs[i]
            bound = _bound(target, need, i + 1, cpus + job.cpus, memory + job.memory,
                           nics + job.nics)
            if bound is None:
                continue
            spent = cost + job.cost
            more = (*chosen, i)
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
