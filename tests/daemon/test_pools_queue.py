"""The queue policy with pools: one line per pool, a head per line, EASY per head.

Properties (hypothesis; fixed seed under the CI profile): no job started behind a head delays
that head; alike jobs of one pool start in queue order; carrying a pass on with new jobs
decides as a whole pass. Examples: the lines' heads, positions and reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

import placement
from placement import Cpu, Host, Node, Request
from vmjobs.daemon.queue import FIRST_IN_LINE, Holding, Plan, Planner, Waiting, order, plan

NOW = 1_000_000.0


def host(name: str, cpus: int = 2, pools: tuple[str, ...] = ("default",)) -> Host:
    return Host(name, (Node(0, tuple(Cpu(i, i, 0, frozenset({i})) for i in range(cpus)),
                            8192),), pools=pools)


def job(job_id: str, cpus: int = 2, pool: str | None = None, on: str | None = None,
        limit: float | None = None) -> Waiting:
    return Waiting(job_id, Request(cpus=cpus, memory_mib=256, pool=pool, host=on), limit)


def hold(cluster: placement.Cluster, job_id: str, cpus: int, on: str) -> None:
    decision = cluster.place(Request(cpus=cpus, memory_mib=256, host=on))
    assert decision.allocation is not None
    cluster.reserve(job_id, decision.allocation)


def started(result: Plan) -> list[str]:
    return [s.job_id for s in result.starts]


def waits(result: Plan) -> dict[str, tuple[int, str | None]]:
    return {w.job_id: (w.position, w.line) for w in result.waits}


# --- examples ----------------------------------------------------------------------------


def test_each_pool_has_its_own_head_and_line() -> None:
    # ci = {a, b}, lab = {c}; every host full, nothing ends by a known time
    cluster = placement.Cluster([host("a", pools=("ci",)), host("b", pools=("ci",)),
                                 host("c", pools=("lab",))])
    for name in "abc":
        hold(cluster, f"r{name}", 2, name)
    queue = [job("ci1", pool="ci"), job("lab1", pool="lab"), job("ci2", pool="ci"),
             job("ci3", pool="ci"), job("lab2", pool="lab")]
    result = plan(cluster, queue, [Holding(f"r{n}", None) for n in "abc"], NOW)
    assert started(result) == []
    assert waits(result) == {"ci1": (1, "ci"), "lab1": (1, "lab"), "ci2": (2, "ci"),
                             "ci3": (3, "ci"), "lab2": (2, "lab")}
    reasons = {w.job_id: w.reason for w in result.waits}
    assert reasons["ci1"].startswith("first in line for pool ci: ")
    assert reasons["lab1"].startswith("first in line for pool lab: ")
    assert FIRST_IN_LINE.sub("", reasons["ci1"]) == reasons["ci1"].split(": ", 1)[1]


def test_a_head_in_one_pool_does_not_hold_back_another_pool() -> None:
    # the ci head needs 4 cpus on one host: it waits; lab's job fits on c and starts, and so
    # does a later ci job that fits on a host the head could use only if it leaves it room
    cluster = placement.Cluster([host("a", 4, ("ci",)), host("c", 2, ("lab",))])
    hold(cluster, "ra", 1, "a")
    result = plan(cluster, [job("big", 4, pool="ci"), job("lab1", 2, pool="lab"),
                            job("small", 1, pool="ci")], [Holding("ra", None)], NOW)
    assert started(result) == ["lab1"]
    assert waits(result)["big"] == (1, "ci")
    assert "would delay big (first in line for pool ci" in \
        next(w.reason for w in result.waits if w.job_id == "small")


def test_a_host_in_two_pools_is_counted_in_both() -> None:
    # b is in ci and lab: a head of either line is protected on it
    cluster = placement.Cluster([host("a", 2, ("ci",)), host("b", 2, ("ci", "lab"))])
    hold(cluster, "ra", 2, "a")
    hold(cluster, "rb", 2, "b")
    holding = [Holding("ra", None), Holding("rb", None)]
    result = plan(cluster, [job("lab1", pool="lab"), job("ci1", pool="ci")], holding, NOW)
    assert waits(result) == {"lab1": (1, "lab"), "ci1": (1, "ci")}  # two heads
    # b frees: lab's head takes it, although ci's job could use it too (it is first)
    cluster.release("rb")
    result = plan(cluster, [job("lab1", pool="lab"), job("ci1", pool="ci")],
                  [holding[0]], NOW)
    assert started(result) == ["lab1"]
    assert [s.allocation.host for s in result.starts] == ["b"]
    assert waits(result) == {"ci1": (1, "ci")}


def test_a_job_pinned_to_a_member_is_in_its_pools_line_and_keeps_its_place() -> None:
    # a and b in ci, both busy; `pinned` wants a, then a ci job comes; a frees first
    cluster = placement.Cluster([host("a", pools=("ci",)), host("b", pools=("ci",))])
    hold(cluster, "rb", 2, "b")
    queue = [job("pinned", on="a"), job("later", pool="ci")]
    hold(cluster, "ra", 2, "a")
    result = plan(cluster, queue, [Holding("ra", None), Holding("rb", None)], NOW)
    assert waits(result) == {"pinned": (1, "ci"), "later": (2, "ci")}
    cluster.release("ra")
    result = plan(cluster, queue, [Holding("rb", None)], NOW)
    assert started(result) == ["pinned"]  # the pool job behind it does not take a
    assert waits(result) == {"later": (1, "ci")}


def test_a_job_for_a_member_of_another_pool_waits_for_that_pools_head() -> None:
    # `anywhere` (no pool) waits in the lines of every pool; `x` heads lab. With room only on
    # b (in ci and lab), `anywhere` may not take it: it would delay lab's head
    cluster = placement.Cluster([host("a", 2, ("ci",)), host("b", 2, ("ci", "lab"))])
    hold(cluster, "ra", 2, "a")
    hold(cluster, "rb", 1, "b")
    queue = [job("x", 2, pool="lab"), job("anywhere", 1)]
    result = plan(cluster, queue, [Holding("ra", None), Holding("rb", None)], NOW)
    assert started(result) == []
    assert waits(result)["x"] == (1, "lab")
    # `anywhere` is first in ci's line (nobody else waits there) but must not delay x
    assert waits(result)["anywhere"] == (1, "ci")
    assert "would delay x (first in line for pool lab" in result.waits[1].reason


def test_a_job_that_would_delay_a_head_where_it_fits_best_starts_elsewhere() -> None:
    # the engine packs: `small` fits best on a, beside the 2 cpus held there, but that would
    # delay ci's head, which needs all of a; b (another pool) has room and no head to delay
    cluster = placement.Cluster([host("a", 4, ("ci",)), host("b", 4, ("other",))])
    hold(cluster, "ra", 2, "a")
    result = plan(cluster, [job("head", 4, pool="ci"), job("small", 1)],
                  [Holding("ra", None)], NOW)
    assert started(result) == ["small"]
    assert [s.allocation.host for s in result.starts] == ["b"]
    assert waits(result) == {"head": (1, "ci")}


def test_one_pool_keeps_the_words_of_a_single_line() -> None:
    cluster = placement.Cluster([host("a")])
    hold(cluster, "ra", 2, "a")
    result = plan(cluster, [job("j1"), job("j2")], [Holding("ra", None)], NOW)
    assert [(w.position, w.line) for w in result.waits] == [(1, "default"), (2, "default")]
    assert result.waits[0].reason.startswith("first in line: ")


# --- properties ----------------------------------------------------------------------------

POOLS = [("ci",), ("lab",), ("ci", "lab"), ("default",)]


@st.composite
def scenario(draw: st.DrawFn) -> tuple[placement.Cluster, list[Holding], list[Waiting]]:
    """2-4 hosts of 2-4 cpus in overlapping pools, some jobs holding cpus (some with an end
    time), and a queue of jobs for a pool, pinned to a host, or free to go anywhere."""
    count = draw(st.integers(2, 4))
    hosts = [host(f"h{i}", draw(st.integers(2, 4)), draw(st.sampled_from(POOLS)))
             for i in range(count)]
    cluster = placement.Cluster(hosts)
    holding = []
    for k, (cpus, on, ends) in enumerate(draw(st.lists(
            st.tuples(st.integers(1, 3), st.integers(0, count - 1),
                      st.one_of(st.none(), st.integers(1, 300))), max_size=6))):
        decision = cluster.place(Request(cpus=cpus, memory_mib=256, host=f"h{on}"))
        if decision.allocation is not None:
            cluster.reserve(f"r{k}", decision.allocation)
            holding.append(Holding(f"r{k}", None if ends is None else NOW + ends))
    queue = []
    for k, (cpus, target, limit) in enumerate(draw(st.lists(
            st.tuples(st.integers(1, 4),
                      st.sampled_from(["ci", "lab", "default", "any", "h0", "h1"]),
                      st.one_of(st.none(), st.integers(1, 400))), min_size=1, max_size=12))):
        pool = target if target in ("ci", "lab", "default") else None
        on = target if target.startswith("h") else None
        queue.append(job(f"j{k}", cpus, pool=pool, on=on,
                         limit=None if limit is None else float(limit)))
    return cluster, holding, queue


def _head_still_fits(cluster: placement.Cluster, head: Request, before: Sequence[Holding],
                     after: Sequence[tuple[str, float | None]]) -> bool:
    """Does `head` fit, at its shadow time computed without the jobs started after it, with
    those of them still running then? (True if it never fits anyway.)"""
    without = cluster.copy()
    for job_id, _ in after:
        without.release(job_id)
    reservation = placement.backfill.reserve_head(without, head, before, NOW)
    if reservation.projected is None:
        return True  # waits for a host to come up: nothing started now can delay it
    projected = cluster.copy()
    shadow = reservation.shadow
    for holder in before:  # every holder gone by the shadow time (all, if it is unknown)
        gone = shadow is None or (holder.ends_at is not None and holder.ends_at <= shadow)
        if gone and holder.job_id in projected.allocations():
            projected.release(holder.job_id)
    for job_id, ends in after:  # later starts gone by then too
        if reservation.shadow is not None and ends is not None and ends <= reservation.shadow:
            projected.release(job_id)
    return projected.place(head).fits


@settings(max_examples=150)
@given(scenario())
def test_no_job_started_behind_a_head_delays_it(
        case: tuple[placement.Cluster, list[Holding], list[Waiting]]) -> None:
    cluster, holding, queue = case
    result = plan(cluster, queue, holding, NOW)
    queued = order(queue)
    index = {w.job_id: i for i, w in enumerate(queued)}
    by_id = {w.job_id: w for w in queued}
    after_all = cluster.copy()
    for start in result.starts:
        after_all.reserve(start.job_id, start.allocation, by_id[start.job_id].request)
    heads = [w.job_id for w in result.waits if w.position == 1 and not w.held]
    assert heads or not result.waits or all(w.held for w in result.waits)
    for head in heads:
        earlier = [s for s in result.starts if index[s.job_id] < index[head]]
        later = [s for s in result.starts if index[s.job_id] > index[head]]
        before = [*holding, *(Holding(s.job_id, _ends(by_id[s.job_id])) for s in earlier)]
        after = [(s.job_id, _ends(by_id[s.job_id])) for s in later]
        assert _head_still_fits(after_all, by_id[head].request, before, after), \
            (head, [s.job_id for s in later])


def _ends(waiting: Waiting) -> float | None:
    return None if waiting.time_limit_s is None else NOW + waiting.time_limit_s


@settings(max_examples=150)
@given(scenario())
def test_alike_jobs_of_a_pool_start_in_queue_order(
        case: tuple[placement.Cluster, list[Holding], list[Waiting]]) -> None:
    """Per pool, of the jobs with one request (and limit), those started are the first ones:
    a later one never takes what an earlier one waits for."""
    cluster, holding, queue = case
    result = plan(cluster, queue, holding, NOW)
    went = set(started(result))
    seen: dict[tuple[Request, float | None], bool] = {}
    for waiting in order(queue):
        key = (waiting.request, waiting.time_limit_s)
        if waiting.job_id in went:
            assert seen.get(key, True), f"{waiting.job_id} overtook an alike job"
        seen[key] = seen.get(key, True) and waiting.job_id in went


@settings(max_examples=100)
@given(scenario(), st.integers(0, 12))
def test_carrying_a_pass_on_decides_as_a_whole_pass_with_pools(
        case: tuple[placement.Cluster, list[Holding], list[Waiting]], cut: int) -> None:
    cluster, holding, queue = case
    queued = order(queue)
    whole = plan(cluster, queued, holding, NOW)
    planner = Planner(cluster, holding)
    first = planner.offer(queued[:cut], NOW)
    rest = planner.offer(queued[cut:], NOW)
    assert first.starts + rest.starts == whole.starts
    assert first.waits + rest.waits == whole.waits


@settings(max_examples=100)
@given(scenario(), st.integers(0, 12), st.lists(st.booleans(), min_size=12, max_size=12))
def test_a_carried_pass_leaves_the_same_verdicts_with_held_array_jobs(
        case: tuple[placement.Cluster, list[Holding], list[Waiting]], cut: int,
        in_array: list[bool]) -> None:
    """With jobs of an array limited to one running (`%1`), held ones are renumbered once a
    line's head is known, so a carried pass may return a job twice; the verdicts the daemon
    keeps (the last one per job, `Daemon.publish_waits(merge=True)`) are a whole pass's."""
    cluster, holding, queue = case
    queue = [replace(w, array="A", array_limit=1) if in_array[k] else w
             for k, w in enumerate(queue)]
    queued = order(queue)
    whole = plan(cluster, queued, holding, NOW)
    planner = Planner(cluster, holding)
    first = planner.offer(queued[:cut], NOW)
    rest = planner.offer(queued[cut:], NOW)
    assert first.starts + rest.starts == whole.starts
    kept = {w.job_id: w for w in first.waits}
    kept.update({w.job_id: w for w in rest.waits})
    assert kept == {w.job_id: w for w in whole.waits}


@settings(max_examples=100)
@given(scenario())
def test_positions_count_each_line_from_its_head(
        case: tuple[placement.Cluster, list[Holding], list[Waiting]]) -> None:
    cluster, holding, queue = case
    result = plan(cluster, queue, holding, NOW)
    by_line: dict[str | None, list[int]] = {}
    for wait in result.waits:
        by_line.setdefault(wait.line, []).append(wait.position)
    for line, positions in by_line.items():
        assert line is not None
        # a job in several lines is shown where it is nearest the front, so a line's
        # positions have gaps but never repeat, and its head is the one at 1
        assert len(positions) == len(set(positions)), (line, positions)
        assert positions.count(1) <= 1


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(["ci", "h0", "h1", "other", "any"]),
                          st.integers(1, 5), st.integers(0, 3)), min_size=1, max_size=14))
def test_a_pool_is_a_fair_counting_semaphore_over_time(
        arrivals: list[tuple[str, int, int]]) -> None:
    """Passes at every arrival and end (as the daemon's are woken), jobs running for their
    durations: ci = {h0, h1}, each fitting one of its 2-cpu jobs; 1-cpu jobs free to go
    anywhere leave members half full. Jobs for the pool start in submit order, and no job
    for the pool takes a member before an earlier job pinned to that member."""
    cluster = placement.Cluster([host("h0", pools=("ci",)), host("h1", pools=("ci",)),
                                 host("h2", pools=("other",))])
    jobs = []
    at = 0.0
    for k, (target, runtime, gap) in enumerate(arrivals):
        at += gap
        jobs.append((at, job(f"j{k}", 1 if target == "any" else 2,
                             pool=target if target in ("ci", "other") else None,
                             on=target if target.startswith("h") else None), float(runtime)))
    now, waiting, running, started = 0.0, [], {}, {}
    pending = list(jobs)
    while pending or waiting or running:
        times = [t for t, _, _ in pending[:1]] + [end for end, _ in running.values()]
        now = min(times)
        for job_id in [j for j, (end, _) in running.items() if end <= now]:
            cluster.release(job_id)
            del running[job_id]
        while pending and pending[0][0] <= now:
            waiting.append(pending.pop(0))
        result = plan(cluster, [w for _, w, _ in waiting],
                      [Holding(j, None) for j in running], now)
        for start in result.starts:
            _, queued, runtime = next(x for x in waiting if x[1].job_id == start.job_id)
            cluster.reserve(start.job_id, start.allocation, queued.request)
            running[start.job_id] = (now + runtime, start.allocation.host)
            started[start.job_id] = (now, start.allocation.host)
        waiting = [x for x in waiting if x[1].job_id not in started]
    assert set(started) == {w.job_id for _, w, _ in jobs}  # everybody ran
    pool_jobs = [w.job_id for _, w, _ in jobs if w.request.pool == "ci"]
    starts = [started[j][0] for j in pool_jobs]
    assert starts == sorted(starts), list(zip(pool_jobs, starts, strict=True))
    for k, (_, pinned, _) in enumerate(jobs):
        if pinned.request.host is None:
            continue
        for _, later, _ in jobs[k + 1:]:
            if later.request.pool == "ci" and started[later.job_id][1] == pinned.request.host:
                assert started[later.job_id][0] >= started[pinned.job_id][0], \
                    (pinned.job_id, later.job_id, started)
