"""EASY backfill exactly: the issue's minimal case, and a property against textbook EASY.

The reference below is EASY as Mu'alem and Feitelson state it (IEEE TPDS 12(6), 2001, after
Lifka 1995), on processors only: no hosts, no NUMA nodes, no memory, no cpu ids. On a flat
cluster (1 host x 1 node, memory never short) `placement.sim` must start every job at the same
time as the reference.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

import placement
from placement import Cpu, Host, Node, NumaPolicy, Request
from placement.sim import SimConfig, SimJob, jobs_from_trace, simulate
from placement.swf import parse_swf
from vmjobs.daemon.queue import Holding, Waiting, plan


@dataclass(frozen=True)
class Job:
    id: str
    submit: int
    run: int
    estimate: int  # >= run: what the scheduler plans with
    procs: int


def textbook_easy(jobs: Sequence[Job], processors: int) -> dict[str, int]:
    """Start time of every job under FCFS + EASY backfill on `processors` identical processors.

    Jobs are queued in the order given (submit order). At every submit and end time, after the
    ends and arrivals of that time: start jobs from the front of the queue while they fit; then
    for the first job that does not (the head), the shadow time is the earliest estimated end
    at which enough processors are free, and the extra processors are those free then beyond
    the head's need. A later job starts now if it fits now and either ends (by its estimate)
    by the shadow time, or needs no more than the extra processors, which it then uses up.
    """
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].submit, i))
    arrivals = [jobs[i] for i in order]
    queue: list[Job] = []
    running: list[tuple[int, int, str]] = []  # (actual end, procs, id): a heap
    estimated: dict[str, int] = {}  # running job -> estimated end
    procs_of: dict[str, int] = {}
    start: dict[str, int] = {}
    free = processors
    i = 0
    while i < len(arrivals) or running:
        times = [running[0][0]] if running else []
        if i < len(arrivals):
            times.append(arrivals[i].submit)
        now = min(times)
        while running and running[0][0] == now:
            _, procs, job_id = heapq.heappop(running)
            free += procs
            del estimated[job_id]
        while i < len(arrivals) and arrivals[i].submit == now:
            if arrivals[i].procs <= processors:
                queue.append(arrivals[i])
            i += 1

        def begin(job: Job, at: int) -> None:
            nonlocal free
            start[job.id] = at
            free -= job.procs
            heapq.heappush(running, (at + job.run, job.procs, job.id))
            estimated[job.id] = at + job.estimate
            procs_of[job.id] = job.procs

        while queue and queue[0].procs <= free:
            begin(queue.pop(0), now)
        if not queue:
            continue
        head = queue[0]
        available = free
        shadow = now
        for end, job_id in sorted((e, j) for j, e in estimated.items()):
            if available >= head.procs:
                break
            available += procs_of[job_id]
            shadow = end
        # Everything that ends by the shadow time is free then, not only what reached the count.
        extra = free + sum(procs_of[j] for j, e in estimated.items() if e <= shadow) - head.procs
        for job in list(queue[1:]):
            if job.procs > free:
                continue
            if now + job.estimate <= shadow:
                begin(job, now)
            elif job.procs <= extra:
                begin(job, now)
                extra -= job.procs
            else:
                continue
            queue.remove(job)
    return start


def flat(processors: int) -> SimConfig:
    return SimConfig(hosts=1, nodes_per_host=1, cores_per_node=processors,
                     mem_per_node_mib=1 << 20, policy="pack")


def sim_starts(jobs: Sequence[Job], processors: int) -> dict[str, int]:
    sim_jobs = [SimJob(j.id, j.submit, j.run, j.estimate,
                       Request(cpus=j.procs, memory_mib=1, numa=NumaPolicy.STRICT))
                for j in sorted(jobs, key=lambda j: j.submit)]  # stable: trace order in a tie
    return dict(simulate(sim_jobs, flat(processors)).starts)


def daemon_starts(jobs: Sequence[Job], processors: int) -> dict[str, int]:
    """Start times when the daemon's queue policy (`vmjobs.daemon.queue.plan`) schedules at
    every submit and end, jobs' time limits being their estimates."""
    host = Host("a", (Node(0, tuple(Cpu(i, i, 0, frozenset({i})) for i in range(processors)),
                           1 << 20),))
    cluster = placement.Cluster([host])
    arrivals = sorted(jobs, key=lambda j: j.submit)
    by_id = {j.id: j for j in jobs}
    waiting: list[Waiting] = []
    holding: dict[str, Holding] = {}
    ends: list[tuple[int, str]] = []
    start: dict[str, int] = {}
    i = 0
    while i < len(arrivals) or ends:
        times = [ends[0][0]] if ends else []
        if i < len(arrivals):
            times.append(arrivals[i].submit)
        now = min(times)
        while ends and ends[0][0] == now:
            cluster.release(heapq.heappop(ends)[1])
        while i < len(arrivals) and arrivals[i].submit == now:
            job = arrivals[i]
            if job.procs <= processors:
                waiting.append(Waiting(job.id, Request(cpus=job.procs, memory_mib=1),
                                       job.estimate))
            i += 1
        holders = [holding[job_id] for job_id in cluster.allocations()]
        result = plan(cluster, waiting, holders, now)
        for s in result.starts:
            job = by_id[s.job_id]
            cluster.reserve(job.id, s.allocation)
            holding[job.id] = Holding(job.id, now + job.estimate)
            heapq.heappush(ends, (now + job.run, job.id))
            start[job.id] = now
        begun = {s.job_id for s in result.starts}
        waiting = [w for w in waiting if w.job_id not in begun]
    return start


# The minimal case, 1 host x 1 node x 8 cores: at t=0 A (2 cores, 5 s), B (4 cores,
# 100 s) and D (2 cores, 50 s) start; A ends at 5. At t=6 the head H asks for 6 cores: 8 are free
# at t=100 when B ends (shadow time 100), 2 more than H needs. At t=7 C asks for 2 cores for
# 1,000 s: it runs past the shadow time, but only on the 2 extra processors, so it starts at 7
# and H still starts at 100. (Reserving cpu ids for H made C wait until 100.)
MINIMAL = [Job("A", 0, 5, 5, 2), Job("B", 0, 100, 100, 4), Job("D", 0, 50, 50, 2),
           Job("H", 6, 10, 10, 6), Job("C", 7, 1000, 1000, 2)]
MINIMAL_STARTS = {"A": 0, "B": 0, "D": 0, "C": 7, "H": 100}


def test_minimal_case_reference() -> None:
    assert textbook_easy(MINIMAL, 8) == MINIMAL_STARTS
    assert daemon_starts(MINIMAL, 8) == MINIMAL_STARTS


def test_minimal_case_simulator_from_a_trace() -> None:
    # The same jobs as SWF lines (number submit wait run procs ... requested procs, time ...);
    # 8 cores and 16 GiB on the one node: memory (2 GiB per core) never binds.
    trace = parse_swf([
        "1 0 -1    5 2 -1 -1 2    5 -1 1 1 1 -1 -1 1 -1 -1",  # A
        "2 0 -1  100 4 -1 -1 4  100 -1 1 1 1 -1 -1 1 -1 -1",  # B
        "3 0 -1   50 2 -1 -1 2   50 -1 1 1 1 -1 -1 1 -1 -1",  # D
        "4 6 -1   10 6 -1 -1 6   10 -1 1 1 1 -1 -1 1 -1 -1",  # H, the head
        "5 7 -1 1000 2 -1 -1 2 1000 -1 1 1 1 -1 -1 1 -1 -1",  # C
    ])
    config = SimConfig(hosts=1, nodes_per_host=1, cores_per_node=8, mem_per_node_mib=16384,
                       policy="pack")
    jobs, skipped = jobs_from_trace(trace, config)
    result = simulate(jobs, config, skipped)
    assert dict(result.starts) == {"j1": 0, "j2": 0, "j3": 0, "j5": 7, "j4": 100}
    assert result.backfills == 1
    by_id = {o.job: o for o in result.outcomes}
    assert by_id["j5"].backfilled and not by_id["j4"].backfilled
    # C kept the 2 cpus it started on, so H's 6 at t=100 are exactly the other ones.
    assert not set(by_id["j5"].cpus) & set(by_id["j4"].cpus)


def test_minimal_case_daemon_queue() -> None:
    # The daemon's policy at t=7 on the same host: A is gone, B ends at 100 and D at 50.
    now = 7.0
    host = Host("a", (Node(0, tuple(Cpu(i, i, 0, frozenset({i})) for i in range(8)), 16384),))
    cluster = placement.Cluster([host])
    for job_id, cpus in (("B", 4), ("D", 2)):
        decision = cluster.place(Request(cpus=cpus, memory_mib=256))
        assert decision.allocation is not None
        cluster.reserve(job_id, decision.allocation)
    queue = [Waiting("H", Request(cpus=6, memory_mib=256), 10),
             Waiting("C", Request(cpus=2, memory_mib=256), 1000)]
    result = plan(cluster, queue, [Holding("B", 100.0), Holding("D", 50.0)], now)
    assert [(s.job_id, s.backfilled) for s in result.starts] == [("C", True)]
    assert result.shadow == 100.0
    # A second long job would take processors H needs at 100: it waits.
    cluster.reserve("C", result.starts[0].allocation)
    again = plan(cluster, [queue[0], Waiting("E", Request(cpus=1, memory_mib=256), 1000)],
                 [Holding("B", 100.0), Holding("D", 50.0), Holding("C", 1007.0)], now)
    assert again.starts == ()


def test_jobs_ending_at_the_shadow_time_all_count_as_free() -> None:
    # 5 processors: Z (1) runs long, X, Y and W (1 each) end at 10; 1 is free. The head (2) fits
    # once X ends, but Y and W end at the same moment, so 2 processors are extra then (0 if
    # only the jobs counted up to the head's need were free): the long job takes one now.
    jobs = [Job("Z", 0, 500, 500, 1), Job("X", 0, 10, 10, 1), Job("Y", 0, 10, 10, 1),
            Job("W", 0, 10, 10, 1), Job("head", 1, 10, 10, 2), Job("long", 2, 500, 500, 1)]
    expected = {"Z": 0, "X": 0, "Y": 0, "W": 0, "long": 2, "head": 10}
    assert textbook_easy(jobs, 5) == expected
    assert sim_starts(jobs, 5) == expected
    assert daemon_starts(jobs, 5) == expected


@st.composite
def flat_traces(draw: st.DrawFn) -> tuple[list[Job], int]:
    processors = draw(st.integers(1, 12))
    count = draw(st.integers(1, 25))
    jobs = []
    submit = 0
    for n in range(count):
        submit += draw(st.integers(0, 15))
        # A few round run times, so that jobs often end at the same moment (ties matter).
        run = draw(st.one_of(st.sampled_from([5, 10, 20]), st.integers(0, 60)))
        jobs.append(Job(f"j{n}", submit, run, run + draw(st.sampled_from([0, 0, 5, 30, 200])),
                        draw(st.integers(1, processors))))
    return jobs, processors


@given(flat_traces())
def test_same_start_times_as_textbook_easy_on_a_flat_cluster(
        trace: tuple[list[Job], int]) -> None:
    jobs, processors = trace
    assert sim_starts(jobs, processors) == textbook_easy(jobs, processors)


@given(flat_traces())
def test_daemon_queue_policy_starts_jobs_as_textbook_easy_on_a_flat_cluster(
        trace: tuple[list[Job], int]) -> None:
    jobs, processors = trace
    assert daemon_starts(jobs, processors) == textbook_easy(jobs, processors)
