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
from enum import StrEnum
from itertools import count

from placement.cluster import Cluster
from placement.errors import Conflict
from placement.filters import HOST_FILTERS, anti_affinity, free_nics, units
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
class Repin:
    """Move a job to other cpus / NUMA nodes of the host it runs on (live: vCPU affinity and
    memory binding change; nothing crosses the network)."""

    job_id: str
    host: str
    memory_mib: int = 0  # what moving it costs: memory that changes NUMA node
    allocation: Allocation | None = None  # where it lands, as planned


@dataclass(frozen=True)
class Checkpoint:
    job_id: str
    memory_mib: int = 0


Action = Migrate | Repin | Checkpoint


@dataclass(frozen=True)
class Plan:
    """`found` says whether the goal is met after `actions`, applied in order.

    cost_mib: memory moved (migrated, written to disk, or between NUMA nodes by a re-pin).
    `allocation`: where the request goes afterwards (plan_to_fit). `freed`: (host, node)
    pairs left empty (plan_rebalance).
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
        if isinstance(action, Repin):
            assert action.allocation is not None
            after.reserve(action.job_id, action.allocation, request)
        elif isinstance(action, Migrate):
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
    cost: int  # a lower bound on the memory moved to take it off the target
    cpus: int  # cpus it frees on the target (idle siblings included)
    memory: int  # memory units it frees on the target, in the request's units
    nics: int  # NICs it frees on the target that the request accepts


@dataclass(frozen=True)
class _Target:
    """Where the request should fit after evictions: one node of a host, or the whole host.

    `required`: members of the request's anti-affinity group on the host; every plan for this
    target moves them off the host, so their freed capacity counts as free and their memory
    as already spent.
    """

    host: str
    node: int | None
    mode: str
    jobs: tuple[_Held, ...]  # optional evictions touching the target, cheapest first
    required: tuple[_Held, ...]
    free_cpus: int
    free_memory: int
    free_nics: int
    suffix: tuple[tuple[int, int, int, float], ...]  # from i on: cpus, memory, nics, min cost/cpu

    @property
    def required_cost(self) -> int:
        return sum(h.cost for h in self.required)


@dataclass(frozen=True)
class _Found:
    """A candidate set whose relocation worked but cost more than its lower bound: queued at
    its real cost, so it is returned only once nothing cheaper can still turn up."""

    plan: Plan


def _movable(cluster: Cluster, job_id: str, request: Request) -> bool:
    theirs = cluster.request_of(job_id)
    if theirs is None:
        return False
    return theirs.host is None or (theirs.preemptible and theirs.priority <= request.priority)


def _in_group(cluster: Cluster, job_id: str, request: Request) -> bool:
    theirs = cluster.request_of(job_id)
    return (request.anti_affinity is not None and theirs is not None
            and theirs.anti_affinity == request.anti_affinity)


@dataclass(frozen=True)
class _Pending:
    """A target not built yet; built when the search first reaches it (most never are)."""

    host: str
    node: int | None
    mode: str


# Host filters a plan can change: a host that fails only these may become a target.
_FIXABLE = (anti_affinity,)


def _pending(cluster: Cluster, need: Need) -> list[tuple[float, _Pending]]:
    """Every possible target with a cheap lower bound on the memory moved to make room there.

    The bound takes the lowest memory-per-cpu any job holds on any node, which no job on the
    target can beat, so best-first search stays exact while it builds only the targets it
    reaches (building one walks every job on its host). A host that fails only the
    anti-affinity filter is a target too: moving the group's member off it makes room.
    """
    request = need.request
    modes = {NumaPolicy.STRICT: ("node",), NumaPolicy.PREFER: ("node", "span"),
             NumaPolicy.ANY: ("either",)}[request.numa]
    per_cpu = min((cost / cpus for a in cluster.allocations().values()
                   for cost, cpus in _per_node_cost(a).values() if cpus), default=0.0)
    found = []
    for name in cluster.hosts:
        ledger = cluster._ledger(name)
        if not ledger.jobs or any(check(ledger, request) for check in HOST_FILTERS
                                  if check not in _FIXABLE):
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


def _per_node_cost(alloc: Allocation) -> dict[int, tuple[int, int]]:
    """node -> (MiB the job holds there, cpus it holds there); idle siblings are not counted
    (their node is the ledger's to say), which only lowers the bound."""
    return {s.node: (s.memory_mib, len(s.cpus)) for s in alloc.nodes}


# What one movable job holds on its host: (job, whole memory, in the request's group,
# node -> (cpus with idle siblings, memory in the request's units, NICs the request accepts,
# MiB held there)).
_Freeable = tuple[str, int, bool, dict[int, tuple[int, int, int, int]]]


def _freeable(cluster: Cluster, ledger: HostLedger, need: Need) -> list[_Freeable] | None:
    """The host's movable jobs, once per host; None when a member of the request's
    anti-affinity group holds a place there and cannot move (the host is then no target)."""
    request = need.request
    found = []
    for job_id in cluster.jobs_on(ledger.host.name):
        in_group = _in_group(cluster, job_id, request)
        if not _movable(cluster, job_id, request):
            if in_group:
                return None
            continue
        alloc = cluster.allocation_of(job_id)
        same_units = alloc.hugepage_kib == need.page_kib
        per_node: dict[int, list[int]] = {}
        for share in alloc.nodes:
            memory = 0
            if same_units:
                memory = (share.memory_mib if need.page_kib is None
                          else pages_for(share.memory_mib, need.page_kib))
            per_node[share.node] = [len(share.cpus), memory, 0, share.memory_mib]
        for cpu in alloc.idle_cpus:
            per_node.setdefault(ledger.node_of_cpu[cpu], [0, 0, 0, 0])[0] += 1
        for address in alloc.devices:
            device = ledger.devices[address]
            if need.wants(device):
                per_node.setdefault(device.node, [0, 0, 0, 0])[2] += 1
        found.append((job_id, alloc.memory_mib, in_group,
                      {n: (c, m, k, mib) for n, (c, m, k, mib) in per_node.items()}))
    return found


def _target(ledger: HostLedger, need: Need, freeable: list[_Freeable], mode: str,
            node: int | None) -> _Target | None:
    mine = [n for n in ledger.nodes if node is None or n.shape.id == node]
    held = []
    required = []
    for job_id, whole, in_group, per_node in freeable:
        cpus = memory = nics = mib = 0
        for node_id, (c, m, k, b) in per_node.items():
            if node is None or node_id == node:
                cpus += c
                memory += m
                nics += k
                mib += b
        # Off a node it may move to another node of the same host (memory moved: at least
        # what it holds on the node); off a host, or out of the group's way, all of it moves.
        cost = whole if node is None or in_group else mib
        if in_group:
            required.append(_Held(job_id, whole, cpus, memory, nics))
        elif cpus or memory or nics:
            held.append(_Held(job_id, cost, cpus, memory, nics))
    free_cpus = sum(len(n.free) for n in mine) + sum(h.cpus for h in required)
    free_memory = sum(units(n, need) for n in mine) + sum(h.memory for h in required)
    nics_free = sum(len(free_nics(ledger, n, need)) for n in mine) if need.nics else 0
    nics_free += sum(h.nics for h in required)
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
        required=tuple(required),
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


def moved_between_nodes(before: Allocation, after: Allocation) -> int:
    """MiB of memory that changes NUMA node when a job is re-pinned from `before` to `after` on
    the same host: what each node holds less afterwards, summed (0 for a change of cpus within
    the same nodes)."""
    now = {s.node: s.memory_mib for s in after.nodes}
    return sum(max(0, s.memory_mib - now.get(s.node, 0)) for s in before.nodes)


def _relocate(work: Cluster, away_from: str, request: Request, jobs: Iterable[str],
              policy: str, off_node: int | None = None,
              must_leave: frozenset[str] = frozenset()) -> list[Action] | None:
    """Move `jobs` off host `away_from` on `work`, biggest first; None (and `work` as it was)
    when one of them can be neither re-pinned, migrated nor checkpointed.

    With `off_node`, a job (other than those in `must_leave`) first tries another node of the
    same host — a re-pin moves only the memory that changes node, and nothing over the
    network — then another host."""
    held = {j: (work.allocation_of(j), work.request_of(j)) for j in jobs}
    for job_id in held:
        work.release(job_id)
    actions: list[Action] = []
    for job_id in sorted(held, key=lambda j: (-held[j][0].memory_mib, j)):
        alloc, theirs = held[job_id]
        assert theirs is not None
        if off_node is not None and job_id not in must_leave:
            local = work.place_within(replace(theirs, host=away_from), policy,
                                      avoid=frozenset({(away_from, off_node)})).allocation
            if local is not None:
                work.reserve(job_id, local, theirs)
                actions.append(Repin(job_id, away_from, moved_between_nodes(alloc, local),
                                     local))
                continue
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
    ordered = _executable_order(work, held, actions)
    if ordered is None:
        _undo(work, held, actions)
    return ordered


def _executable_order(work: Cluster, held: dict[str, tuple[Allocation, Request | None]],
                      actions: list[Action]) -> list[Action] | None:
    """`actions` in an order in which each can be carried out, one at a time, from the cluster
    as it is before any of them; None when there is none (two jobs trading places).

    The jobs were released together and placed one by one, so a job re-pinned on the host may
    have been given cpus (or node memory) that another job being moved still holds until its
    own move: that move must come first. Migrations and checkpoints leave the host and never
    wait; re-pins go as soon as what they land on is free."""
    if sum(isinstance(a, Repin) for a in actions) == 0 or len(actions) < 2:
        return actions
    trial = work.copy()
    for action in actions:
        if not isinstance(action, Checkpoint):
            trial.release(action.job_id)
    for job_id, (alloc, theirs) in held.items():
        trial.reserve(job_id, alloc, theirs)
    pending = sorted(actions, key=lambda a: isinstance(a, Repin))  # stable: moves away first
    order: list[Action] = []
    while pending:
        for action in pending:
            alloc, theirs = held[action.job_id]
            trial.release(action.job_id)
            if isinstance(action, Checkpoint):
                break
            assert action.allocation is not None
            try:
                trial.reserve(action.job_id, action.allocation, theirs)
                break
            except Conflict:
                trial.reserve(action.job_id, alloc, theirs)  # not yet: put it back
        else:
            return None
        order.append(action)
        pending.remove(action)
    return order


def _undo(work: Cluster, held: dict[str, tuple[Allocation, Request | None]],
          actions: list[Action]) -> None:
    for action in actions:
        if not isinstance(action, Checkpoint):
            work.release(action.job_id)
    for job_id, (alloc, theirs) in held.items():
        work.reserve(job_id, alloc, theirs)


_Entry = tuple[float, float, int, int, "_Target | _Pending | _Found", tuple[int, ...]]


def plan_to_fit(cluster: Cluster, request: Request, *, policy: str = "pack",
                time_budget_s: float | None = 0.05, max_actions: int = 4,
                max_steps: int | None = None) -> Plan:
    """The cheapest re-pins / migrations / checkpoints after which `request` fits (cost: MiB of
    memory moved — between hosts, to disk, or between NUMA nodes of one host for a re-pin).

    Best-first (A*) over sets of jobs to evict from one target (a node for strict, a host
    otherwise), cheapest lower bound first; each candidate set is checked with the real
    filters, then its jobs are re-placed with `policy`: off a node, onto another node of the
    same host when one has room (a `Repin`), else onto another host (a `Migrate`), else
    checkpointed. When that costs more than the set's lower bound the plan is queued at its
    real cost, so the plan returned is the cheapest the search can build. Members of the
    request's anti-affinity group on the target host always move. Evicted jobs are not
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
    heap: list[_Entry] = [(bound, 0, next(order), 0, target, ()) for bound, target in pending]
    heapq.heapify(heap)
    freeable: dict[str, list[_Freeable] | None] = {}
    work: Cluster | None = None  # copied on first use: most candidate sets fail before it
    steps = 0
    while heap:
        steps += 1
        if (deadline is not None and time.perf_counter() > deadline) or (
                max_steps is not None and steps > max_steps):
            return Plan(False, (), 0, "no plan found within the search budget", complete=False)
        _, cost, _, _, target, chosen = heapq.heappop(heap)
        if isinstance(target, _Found):
            return target.plan
        if isinstance(target, _Pending):
            steps -= 1  # building a target is not a candidate set
            ledger = cluster._ledger(target.host)
            if target.host not in freeable:
                freeable[target.host] = _freeable(cluster, ledger, need)
            jobs_here = freeable[target.host]
            built = None
            if jobs_here is not None:
                built = _target(ledger, need, jobs_here, target.mode, target.node)
            if built is not None:
                bound = _bound(built, need, 0, 0, 0, 0)
                assert bound is not None
                spent = built.required_cost
                heapq.heappush(heap, (spent + bound, spent, next(order), 0, built, ()))
            continue
        jobs = [h.job_id for h in target.required] + [target.jobs[i].job_id for i in chosen]
        freed = [target.jobs[i] for i in chosen]
        cpus = sum(h.cpus for h in freed)
        memory = sum(h.memory for h in freed)
        nics = sum(h.nics for h in freed)
        short = _bound(target, need, len(target.jobs), cpus, memory, nics)
        if jobs and short == 0.0 and _fits_after(cluster, target, need, jobs):
            work = work or cluster.copy()
            actions = _relocate(work, target.host, request, jobs, policy, target.node,
                                frozenset(h.job_id for h in target.required))
            if actions is not None:
                placed = work.place_within(request, policy).allocation
                _undo(work, {j: (cluster.allocation_of(j), cluster.request_of(j))
                             for j in jobs}, actions)
                if placed is not None:
                    moved = sum(a.memory_mib for a in actions)
                    plan = Plan(True, tuple(actions), moved, _describe(actions, placed), placed)
                    if moved <= cost:
                        return plan
                    heapq.heappush(heap, (moved, moved, next(order), 0, _Found(plan), ()))
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
    kinds = [(Repin, "re-pin"), (Migrate, "migration"), (Checkpoint, "checkpoint")]
    parts = [plural(n, word) for kind, word in kinds
             if (n := sum(isinstance(a, kind) for a in actions))]
    moved = format_mib(sum(a.memory_mib for a in actions))
    verb = "makes" if len(actions) == 1 else "make"
    return f"{' and '.join(parts)} ({moved} moved) {verb} room on {placed.host}"


# --- plan_rebalance -----------------------------------------------------------------------


class Objective(StrEnum):
    """What plan_rebalance optimises."""

    WHOLE_NODES = "whole-nodes"  # NUMA nodes left entirely free
    FRAGMENTS = "fragments"  # fragment rate for jobs of a target size (placement.fragments)


def plan_rebalance(cluster: Cluster, max_moves: int, *, policy: str = "pack",
                   time_budget_s: float | None = 0.5,
                   objective: Objective | str = Objective.WHOLE_NODES,
                   target_cpus: int = 16) -> Plan:
    """Moves, at most `max_moves` (the migration limit, MNL), that defragment the cluster.

    objective "whole-nodes": migrations that each leave a whole NUMA node empty. Greedy: nodes
    that are cheapest to empty (least memory to move) go first; their jobs go to other hosts,
    never onto a node that is empty now or freed by the plan. A node is only emptied if all
    of its jobs can move.

    objective "fragments": re-pins and migrations that lower the fragment rate for jobs of
    `target_cpus` cpus (`placement.fragments.plan_fragments`). Raises ValueError for an
    unknown objective or target_cpus < 1.
    """
    objective = Objective(objective)
    if objective == Objective.FRAGMENTS:
        # imported here: placement.fragments builds on this module's actions
        from placement.fragments import plan_fragments
        return plan_fragments(cluster, max_moves, target_cpus, policy=policy,
                              time_budget_s=time_budget_s)
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
