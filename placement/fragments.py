"""The fragmentation objective: free cpus that no job of a target size can use, and migrations
that reduce them under a migration limit.

Fragment rate (VMR2L: Guo et al., "Deep Reinforcement Learning for VM Rescheduling", NSDI'24,
section 2): over every NUMA node of the up hosts, Σ (free cpus mod S) / Σ free cpus, for a
target job size S (16 there). Moves never change Σ free cpus, so lowering the rate means
turning remainders into whole S-cpu slots: a move of a c-cpu job from node a to node b lowers
Σ (free mod S) by S exactly when it completes a slot on a (a's remainder + c >= S) and b's
remainder can take c; otherwise it changes nothing or costs a slot on b.

`plan_fragments` searches a small model of the cluster (free cpus and memory per node, the
movable jobs held on one node) for the fewest moves that complete a slot, takes the best, and
checks each move with the real filters on a copy of the cluster before it counts.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, replace
from itertools import combinations

from placement.cluster import Cluster
from placement.ledger import NodeLedger
from placement.model import Allocation, HostState, Request
from placement.plans import Action, Migrate, Objective, Plan, Repin, moved_between_nodes
from placement.units import format_mib, plural

NodeKey = tuple[str, int]  # (host, NUMA node id)
MAX_SET = 4  # most jobs moved together to complete one slot


def fragment_rate(cluster: Cluster, target_cpus: int) -> float:
    """Σ (free cpus mod S) / Σ free cpus over the NUMA nodes of up hosts; 0.0 when nothing is
    free. Raises ValueError for S < 1."""
    if target_cpus < 1:
        raise ValueError(f"target size must be at least 1 cpu; got {target_cpus}")
    free = [len(n.free) for name in cluster.hosts for n in _up_nodes(cluster, name)]
    total = sum(free)
    return sum(f % target_cpus for f in free) / total if total else 0.0


def whole_free_nodes(cluster: Cluster) -> int:
    """NUMA nodes of up hosts with every cpu and all memory free."""
    return sum(n.is_empty() for name in cluster.hosts for n in _up_nodes(cluster, name))


def _up_nodes(cluster: Cluster, host: str) -> tuple[NodeLedger, ...]:
    ledger = cluster._ledger(host)
    return ledger.nodes if ledger.host.state == HostState.UP else ()


@dataclass
class _Job:
    job_id: str
    node: NodeKey
    cpus: int  # cpus it holds there, idle siblings included
    memory: int  # MiB


@dataclass
class _Model:
    """Free cpus and memory per node, and the movable jobs on each node."""

    free: dict[NodeKey, int]
    memory: dict[NodeKey, int]
    jobs: dict[NodeKey, list[_Job]]


def _model(cluster: Cluster) -> _Model:
    free: dict[NodeKey, int] = {}
    memory: dict[NodeKey, int] = {}
    jobs: dict[NodeKey, list[_Job]] = {}
    for name in cluster.hosts:
        for node in _up_nodes(cluster, name):
            key = (name, node.shape.id)
            free[key] = len(node.free)
            memory[key] = node.memory_free
            jobs[key] = []
    for job_id, alloc in cluster.allocations().items():
        request = cluster.request_of(job_id)
        if not _movable(alloc, request):
            continue
        key = (alloc.host, alloc.nodes[0].node)
        if key in jobs:
            assert request is not None
            jobs[key].append(_Job(job_id, key, len(alloc.cpus) + len(alloc.idle_cpus),
                                  alloc.memory_mib))
    return _Model(free, memory, jobs)


def _movable(alloc: Allocation, request: Request | None) -> bool:
    """Jobs the model can move: reserved with a request naming no host (the daemon ties jobs
    that may not move to their host), on one node, ordinary memory (no hugepages) and no NICs
    (a NIC ties a job to its node's devices)."""
    return (request is not None and request.host is None and len(alloc.nodes) == 1
            and alloc.hugepage_kib is None and not alloc.devices)


def move_to_node(work: Cluster, job_id: str, host: str, node: int,
                 policy: str = "pack") -> Action | None:
    """Move `job_id` on `work` onto node `node` of `host` (its request checked by the real
    filters); the action, or None with `work` unchanged when it does not fit there."""
    request = work.request_of(job_id)
    assert request is not None
    before = work.release(job_id)
    others = frozenset((host, n.shape.id) for n in work._ledger(host).nodes if n.shape.id != node)
    placed = work.place_within(replace(request, host=host), policy, avoid=others).allocation
    if placed is None:
        work.reserve(job_id, before, request)
        return None
    work.reserve(job_id, placed, request)
    if host == before.host:
        return Repin(job_id, host, moved_between_nodes(before, placed), placed)
    return Migrate(job_id, host, before.memory_mib, placed)


def _sets(jobs: list[_Job], short: int, most: int, room: int, *, first_only: bool = False,
          limit: int = 32) -> list[tuple[_Job, ...]]:
    """Sets of jobs holding at least `short` cpus together, none bigger than `room` (the
    largest remainder any node has), at most `most` jobs: fewer jobs first, then fewer cpus,
    then less memory; one set per multiset of sizes (they land alike), at most `limit` (the
    first that can land wins). `first_only`: just the best set (a queue key)."""
    ordered = sorted((j for j in jobs if j.cpus <= room), key=lambda j: (-j.cpus, j.memory,
                                                                        j.job_id))
    found: list[tuple[_Job, ...]] = []
    for k in range(1, min(most, len(ordered)) + 1):
        if sum(j.cpus for j in ordered[:k]) < short:
            continue
        these = []
        seen = set()
        for chosen in combinations(ordered, k):
            held = sum(j.cpus for j in chosen)
            shape = tuple(j.cpus for j in chosen)
            if held < short or shape in seen:
                continue
            seen.add(shape)
            these.append(((held, sum(j.memory for j in chosen)), chosen))
        these.sort(key=lambda f: f[0])
        found.extend(chosen for _, chosen in these)
        if first_only or len(found) >= limit:
            break
    return found[:1] if first_only else found[:limit]


def _land(work: Cluster, model: _Model, moving: tuple[_Job, ...], source: NodeKey, size: int,
          policy: str) -> list[Action] | None:
    """Put each job (biggest first) into another node's remainder (free mod S), tightest fit
    first, so no other node loses a slot; None with `work` and `model` as they were when one
    cannot go."""
    actions: list[Action] = []
    undo: list[tuple[str, Allocation, NodeKey, int, int]] = []
    for job in sorted(moving, key=lambda j: (-j.cpus, j.job_id)):
        spots = sorted((model.free[k] % size, k) for k in model.free
                       if k != source and model.free[k] % size >= job.cpus
                       and model.memory[k] >= job.memory)
        original = work.allocation_of(job.job_id)
        for _, key in spots:
            action = move_to_node(work, job.job_id, key[0], key[1], policy)
            if action is not None:
                actions.append(action)
                model.free[key] -= job.cpus
                model.memory[key] -= job.memory
                undo.append((job.job_id, original, key, job.cpus, job.memory))
                break
        else:
            # Every job of the set came off `source` and none landed there, so their old
            # cpus are still free.
            for job_id, alloc, key, cpus, memory in reversed(undo):
                request = work.request_of(job_id)
                work.release(job_id)
                work.reserve(job_id, alloc, request)
                model.free[key] += cpus
                model.memory[key] += memory
            return None
    return actions


def plan_fragments(cluster: Cluster, max_moves: int, target_cpus: int, *,
                   policy: str = "pack", max_set: int = MAX_SET,
                   time_budget_s: float | None = None) -> Plan:
    """Re-pins and migrations, at most `max_moves`, that lower the fragment rate for jobs of
    `target_cpus` cpus.

    Greedy over slot completions: for every node, the fewest movable jobs (at most `max_set`,
    then, once no such set is left, at most twice that) whose cpus complete a free S-cpu slot
    there; the node needing the fewest moves (then the
    fewest cpus, then the least memory) goes first, its jobs landing in other nodes'
    remainders, tightest first, so that no node loses a slot. Every move is checked with the
    real filters on a copy. A plain one-move greedy stops when no single move completes a
    slot; sets of 2-4 moves keep going. Raises ValueError for target_cpus < 1.
    """
    if target_cpus < 1:
        raise ValueError(f"target size must be at least 1 cpu; got {target_cpus}")
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    size = target_cpus
    work = cluster.copy()
    model = _model(work)
    before = fragment_rate(cluster, size)
    actions: list[Action] = []
    heap: list[tuple[int, int, int, str, int, NodeKey]] = []
    blocked: list[NodeKey] = []

    def room() -> int:
        return max((f % size for f in model.free.values()), default=0)

    def push(key: NodeKey, largest: int, most: int) -> None:
        short = size - model.free[key] % size
        found = _sets(model.jobs[key], short, most, largest, first_only=True)
        if found:
            chosen = found[0]
            heapq.heappush(heap, (len(chosen), sum(j.cpus for j in chosen),
                                  sum(j.memory for j in chosen), key[0], key[1], key))

    complete = True
    # Sets of up to `max_set` jobs; when that runs dry with moves left, once more with sets
    # twice as large (many combinations, so only then: on big clusters the limit comes first).
    for most in (max_set, 2 * max_set):
        heap.clear()
        blocked.clear()
        largest = room()
        for key in model.free:
            push(key, largest, most)
        while heap and len(actions) < max_moves and complete:
            if deadline is not None and time.perf_counter() > deadline:
                complete = False
                break
            count, _, _, _, _, key = heapq.heappop(heap)
            short = size - model.free[key] % size
            found = _sets(model.jobs[key], short, most, largest)
            if not found:
                continue
            if len(found[0]) != count:  # stale: the node changed since it was queued
                push(key, largest, most)
                continue
            landed = None
            for chosen in found:
                if len(actions) + len(chosen) <= max_moves:
                    landed = _land(work, model, chosen, key, size, policy)
                    if landed is not None:
                        break
            if landed is None:
                blocked.append(key)
                continue
            actions.extend(landed)
            gone = {j.job_id for j in chosen}
            model.jobs[key] = [j for j in model.jobs[key] if j.job_id not in gone]
            model.free[key] += sum(j.cpus for j in chosen)
            model.memory[key] += sum(j.memory for j in chosen)
            for action in landed:
                alloc = action.allocation
                assert alloc is not None
                dest = (alloc.host, alloc.nodes[0].node)
                job = next(j for j in chosen if j.job_id == action.job_id)
                job.node = dest
                model.jobs[dest].append(job)
            # Remainders changed: nodes that could not place their set may now.
            largest = room()
            for again in {key, *blocked, *((a.allocation.host, a.allocation.nodes[0].node)
                                           for a in landed if a.allocation is not None)}:
                push(again, largest, most)
            blocked.clear()
    after = fragment_rate(work, size)
    cost = sum(a.memory_mib for a in actions)
    summary = (f"fragment rate for {size}-cpu jobs {before:.3f} -> {after:.3f} with "
               f"{plural(len(actions), 'move')} ({format_mib(cost)} moved)")
    return Plan(after < before, tuple(actions), cost, summary, complete=complete)


def objective_value(cluster: Cluster, objective: str, target_cpus: int = 16) -> float:
    """The figure an objective is judged by: whole free NUMA nodes ("whole-nodes", higher is
    better) or the fragment rate ("fragments", lower is better). Raises ValueError for an
    unknown objective."""
    if Objective(objective) == Objective.FRAGMENTS:
        return fragment_rate(cluster, target_cpus)
    return float(whole_free_nodes(cluster))
