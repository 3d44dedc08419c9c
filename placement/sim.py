"""Replay an SWF trace over a synthetic cluster: FIFO + EASY backfill over the real engine.

    python -m placement.sim TRACE.swf --hosts 8 --nodes-per-host 2 --cores-per-node 16 \\
        --mem-per-node 64G --policy all

Deterministic: the same trace and flags give the same figures (plans are bounded by search
steps, not time). Job -> request: requested processors (allocated ones when not given) and
requested memory per processor (used memory when not given, else a node's memory shared evenly
by its cores). A job that fits one node in cores and memory gets `--numa strict` (as a pinned
HPC job wants); a bigger one spans the nodes of one host (`--numa any`). A job bigger than a
host never fits: gangs across hosts are out of scope, so it is rejected and counted. A job with
no size, no run time or no submit time is skipped and counted: a run time is never invented.
Migrations are instantaneous and free in simulated time; the figures count them. Backfill is
EASY's (placement.backfill). `--jobs-csv FILE` writes every job's outcome, so that start times
can be checked against any other simulator. `--borrow` replays each policy twice, without and
with borrowing (placement.borrowsim, docs/borrowing.md), and prints both side by side.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NoReturn

from placement.backfill import Holding, reserve_head
from placement.cluster import Cluster
from placement.model import Allocation, NumaPolicy, Request
from placement.plans import Migrate, Repin, plan_to_fit
from placement.swf import Trace, parse_swf
from placement.synthetic import make_hosts

POLICIES = ("firstfit", "pack", "pack+migrate", "spread")
TAU = 10  # seconds: bounded slowdown ignores how slow very short jobs feel


@dataclass(frozen=True)
class SimConfig:
    hosts: int = 8
    nodes_per_host: int = 2
    cores_per_node: int = 16
    mem_per_node_mib: int = 65536
    policy: str = "pack"
    plan_steps: int = 200  # plan_to_fit search bound per attempt

    @property
    def placement_policy(self) -> str:
        return self.policy.removesuffix("+migrate")

    @property
    def migrates(self) -> bool:
        return self.policy.endswith("+migrate")


@dataclass(frozen=True)
class SimJob:
    id: str  # "j<number>"; "j<number>.<k>" for the k-th repeat of a number in the trace
    submit: int
    run: int
    estimate: int  # what EASY plans with: the requested time, never below the real run time
    request: Request
    # Processors it kept busy on average (SWF average CPU time x processors / run time, at most
    # its processors); -1 when the trace does not say. Only borrowing (placement.borrowsim)
    # reads it.
    used_cpus: float = -1.0


class Status(StrEnum):
    RAN = "ran"
    REJECTED = "rejected"  # can never fit the simulated cluster
    SKIPPED = "skipped"  # no size, no run time or no submit time in the trace


@dataclass(frozen=True)
class Outcome:
    """What became of one trace job. Times in the trace's seconds; where it started (a
    migration under pack+migrate may move it later)."""

    job: str
    submit: int  # -1 when the trace does not say
    status: Status
    start: int | None = None
    end: int | None = None
    host: str | None = None
    cpus: tuple[int, ...] = ()  # host cpu ids its vCPUs were pinned to
    backfilled: bool = False  # started by EASY backfill, ahead of the head of the queue


@dataclass(frozen=True)
class SimResult:
    policy: str
    jobs: int  # jobs that ran
    rejected: int  # jobs that can never fit the simulated cluster
    skipped: int  # trace jobs without a size, a run time or a submit time
    utilization: float  # busy core-seconds / (cores x span from first submit to last end)
    mean_wait_s: float
    p95_wait_s: float
    bounded_slowdown: float  # mean of max(1, (wait + run) / max(run, TAU))
    # Time-averaged free cores the head of the queue cannot use (on nodes, or hosts for a job
    # that spans nodes, short of its cores or memory); 0 while the queue is empty.
    stranded_cores: float
    migrations: int
    backfills: int = 0  # jobs EASY started ahead of the head of the queue
    starts: tuple[tuple[str, int], ...] = ()  # (job id, start time) in the order jobs started
    # One per trace job: those that ran or were rejected in submit order, then skipped ones.
    outcomes: tuple[Outcome, ...] = ()
    elapsed_s: float = field(default=0.0, compare=False)  # wall clock of the simulation itself


def jobs_from_trace(trace: Trace, config: SimConfig) -> tuple[list[SimJob], list[Outcome]]:
    """(jobs in submit order, then trace order; the trace jobs skipped for lack of a size, a
    run time or a submit time, in trace order). Job ids are "j<number>", "j<number>.<k>" for
    the k-th repeat of a number in the trace (skipped jobs count)."""
    default_kb = config.mem_per_node_mib * 1024 // max(config.cores_per_node, 1)
    numbered: list[tuple[int, int, SimJob]] = []
    seen: dict[int, int] = {}
    skipped: list[Outcome] = []
    for position, job in enumerate(trace.jobs):
        repeat = seen.get(job.number, 0)
        seen[job.number] = repeat + 1
        name = f"j{job.number}" if not repeat else f"j{job.number}.{repeat}"
        procs = job.procs
        if procs <= 0 or job.run < 0 or job.submit < 0:
            # The requested time would be a guess at the run time, and usually a long one:
            # replaying it would add load the real cluster never carried.
            skipped.append(Outcome(name, max(job.submit, -1), Status.SKIPPED))
            continue
        # Unknown memory: a node's memory shared evenly by its cores, so cores bind first.
        kb = job.memory_kb_per_proc if job.memory_kb_per_proc > 0 else default_kb
        memory = max(1, math.ceil(kb * procs / 1024))
        one_node = procs <= config.cores_per_node and memory <= config.mem_per_node_mib
        request = Request(cpus=procs, memory_mib=memory,
                          numa=NumaPolicy.STRICT if one_node else NumaPolicy.ANY)
        used = (min(float(procs), job.average_cpu_s * procs / job.run)
                if job.average_cpu_s >= 0 and job.run > 0 else -1.0)
        numbered.append((job.submit, position, SimJob(name, job.submit, job.run,
                                                      max(job.run, job.requested_time),
                                                      request, used)))
    numbered.sort(key=lambda item: item[:2])  # by submit time, then trace order
    return [job for _, _, job in numbered], skipped


@dataclass
class _Running:
    job: SimJob
    allocation: Allocation
    start: int


class _Simulation:
    """One replay; the state of the queue, the cluster and the accumulated figures."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.cluster = Cluster(make_hosts(config.hosts, nodes=config.nodes_per_host,
                                          cores=config.cores_per_node,
                                          memory_mib=config.mem_per_node_mib))
        self.total = config.hosts * config.nodes_per_host * config.cores_per_node
        self.busy = 0
        self.queue: list[SimJob] = []
        self.running: dict[str, _Running] = {}
        self.ends: list[tuple[int, str]] = []
        self.waits: list[int] = []
        self.slowdowns: list[float] = []
        self.migrations = 0
        self.rejected = 0
        self.busy_seconds = 0.0
        self.stranded_seconds = 0.0
        self.stranded = 0
        self.starts: list[tuple[str, int]] = []
        self.outcomes: dict[str, Outcome] = {}
        self.backfills = 0
        self._ever: dict[tuple[int, int, NumaPolicy], bool] = {}

    def run(self, jobs: Sequence[SimJob]) -> tuple[int, int]:
        """Replay; returns (first submit, last end)."""
        arrivals = list(jobs)
        i = 0
        now = first = arrivals[0].submit if arrivals else 0
        while i < len(arrivals) or self.ends or self._next_event() < math.inf:
            nxt = min(arrivals[i].submit if i < len(arrivals) else math.inf,
                      self.ends[0][0] if self.ends else math.inf, self._next_event())
            self.busy_seconds += self.busy * (nxt - now)
            self.stranded_seconds += self.stranded * (nxt - now)
            self._advance(int(nxt) - now)
            now = int(nxt)
            # Only owner events start a scheduling pass: a pass at an unchanged state may still
            # start jobs (EASY tries candidates in queue order, so one pass need not be a fixed
            # point), and the other layer's events must not change this layer's replay.
            changed = bool(self.ends and self.ends[0][0] == now
                           or i < len(arrivals) and arrivals[i].submit == now)
            while self.ends and self.ends[0][0] == now:
                _, job_id = heapq.heappop(self.ends)
                done = self.running.pop(job_id)
                self.cluster.release(job_id)
                self.busy -= len(done.allocation.cpus)
            while i < len(arrivals) and arrivals[i].submit == now:
                job = arrivals[i]
                i += 1
                if not self._ever_fits(job.request):
                    self.rejected += 1
                    self.outcomes[job.id] = Outcome(job.id, job.submit, Status.REJECTED)
                else:
                    self.queue.append(job)
            if changed:
                self._schedule(now)
                self.stranded = self._stranded()
            self._after(now)
        return first, now

    # Hooks for a second layer of jobs that runs in what this one leaves (placement.borrowsim):
    # no-ops here, so a replay without it is exactly the replay it always was.
    def _next_event(self) -> float:
        """The next time (seconds) the other layer must act at; inf when it has nothing."""
        return math.inf

    def _advance(self, seconds: int) -> None:
        """Simulated time moves on by `seconds` in the state left by the last step."""

    def _after(self, now: int) -> None:
        """Called once per event time, after this layer's ends, arrivals and starts."""

    def _ever_fits(self, request: Request) -> bool:
        shape = (request.cpus, request.memory_mib, request.numa)
        if shape not in self._ever:
            self._ever[shape] = self.cluster.ever_fits(request)
        return self._ever[shape]

    def _start(self, job: SimJob, alloc: Allocation, now: int, backfilled: bool = False) -> None:
        self.cluster.reserve(job.id, alloc, job.request)
        self.running[job.id] = _Running(job, alloc, now)
        heapq.heappush(self.ends, (now + job.run, job.id))
        self.busy += len(alloc.cpus)
        self.starts.append((job.id, now))
        self.outcomes[job.id] = Outcome(job.id, job.submit, Status.RAN, now, now + job.run,
                                        alloc.host, alloc.cpus, backfilled)
        self.backfills += backfilled
        wait = now - job.submit
        self.waits.append(wait)
        self.slowdowns.append(max(1.0, (wait + job.run) / max(job.run, TAU)))

    def _schedule(self, now: int) -> None:
        policy = self.config.placement_policy
        while self.queue:
            head = self.queue[0]
            decision = self.cluster.place(head.request, policy)
            if decision.allocation is None and self._make_room(head):
                decision = self.cluster.place(head.request, policy)
            if decision.allocation is None:
                break
            self.queue.pop(0)
            self._start(head, decision.allocation, now)
        if len(self.queue) > 1:
            self._backfill(now)

    def _make_room(self, head: SimJob) -> bool:
        if not self.config.migrates or self.total - self.busy < head.request.cpus:
            return False  # migrations move capacity around; they cannot create it
        plan = plan_to_fit(self.cluster, head.request, policy=self.config.placement_policy,
                           time_budget_s=None, max_steps=self.config.plan_steps)
        if not plan.found:
            return False
        for action in plan.actions:
            assert isinstance(action, Migrate | Repin) and action.allocation is not None
            self.cluster.release(action.job_id)
            self.cluster.reserve(action.job_id, action.allocation, self.running[
                action.job_id].job.request)
            self.running[action.job_id].allocation = action.allocation
            self.migrations += 1
        return True

    def _backfill(self, now: int) -> None:
        """EASY (see placement.backfill): a later job may start now if it fits now and either
        ends (by its estimate) before the head's shadow time, or the head, re-placed on the
        cluster as it will be then, still fits with the job held."""
        reservation = reserve_head(
            self.cluster, self.queue[0].request,
            [Holding(r.job.id, r.start + r.job.estimate) for r in self.running.values()],
            now, self.config.placement_policy)
        # A start only takes capacity, so a shape that failed stays failing for this pass.
        failed: set[tuple[int, int, NumaPolicy]] = set()
        for job in list(self.queue[1:]):
            request = job.request
            shape = (request.cpus, request.memory_mib, request.numa)
            if request.cpus > self.total - self.busy or shape in failed:
                continue
            decision = self.cluster.place(request, self.config.placement_policy)
            if decision.allocation is None:
                failed.add(shape)
                continue
            if not reservation.admits(job.id, decision.allocation, request,
                                      now + job.estimate):
                continue
            self.queue.remove(job)
            self._start(job, decision.allocation, now, backfilled=True)

    def _stranded(self) -> int:
        """Free cores on nodes (hosts, for spanning jobs) that cannot take the head."""
        if not self.queue:
            return 0
        request = self.queue[0].request
        stranded = 0
        for host in self.cluster.hosts:
            usage = self.cluster.free(host)
            if request.numa == NumaPolicy.STRICT:
                for node in usage.nodes:
                    if node.cpus_free < request.cpus or node.memory_free_mib < request.memory_mib:
                        stranded += node.cpus_free
            elif usage.cpus_free < request.cpus or usage.memory_free_mib < request.memory_mib:
                stranded += usage.cpus_free
        return stranded


def simulate(jobs: Sequence[SimJob], config: SimConfig,
             skipped: Sequence[Outcome] = ()) -> SimResult:
    """Replay `jobs` (in submit order, as `jobs_from_trace` gives them) on the cluster of
    `config`; `skipped` are carried into the result's outcomes and count."""
    began = time.perf_counter()
    sim = _Simulation(config)
    first, last = sim.run(jobs)
    span = max(last - first, 1)
    waits = sorted(sim.waits)
    return SimResult(
        policy=config.policy,
        jobs=len(waits),
        rejected=sim.rejected,
        skipped=len(skipped),
        utilization=sim.busy_seconds / (sim.total * span),
        mean_wait_s=sum(waits) / len(waits) if waits else 0.0,
        p95_wait_s=float(_percentile(waits, 0.95)),
        bounded_slowdown=sum(sim.slowdowns) / len(sim.slowdowns) if sim.slowdowns else 0.0,
        stranded_cores=sim.stranded_seconds / span,
        migrations=sim.migrations,
        backfills=sim.backfills,
        starts=tuple(sim.starts),
        outcomes=(*(sim.outcomes[j.id] for j in jobs), *skipped),
        elapsed_s=time.perf_counter() - began,
    )


def _percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def format_table(results: Sequence[SimResult]) -> str:
    head = (f"{'policy':<14}{'jobs':>6}{'rejected':>10}{'util %':>8}{'mean wait':>11}"
            f"{'p95 wait':>10}{'bsld':>8}{'stranded':>10}{'backfills':>11}{'migrations':>12}"
            f"{'sim s':>8}")
    rows = [head]
    for r in results:
        rows.append(
            f"{r.policy:<14}{r.jobs:>6}{r.rejected:>10}{100 * r.utilization:>8.1f}"
            f"{_duration(r.mean_wait_s):>11}{_duration(r.p95_wait_s):>10}"
            f"{r.bounded_slowdown:>8.2f}{r.stranded_cores:>10.2f}{r.backfills:>11}"
            f"{r.migrations:>12}{r.elapsed_s:>8.1f}"
        )
    return "\n".join(rows)


CSV_HEADER = ("job", "submit", "start", "end", "host", "cpus", "status")


def csv_rows(outcomes: Sequence[Outcome]) -> list[tuple[str, ...]]:
    """`--jobs-csv` rows, header first: times in the trace's seconds, `cpus` the host cpu ids
    separated by spaces; fields a job does not have (a rejected job's start, an unknown
    submit time) are empty."""
    rows: list[tuple[str, ...]] = [CSV_HEADER]
    for o in outcomes:
        rows.append((o.job, str(o.submit) if o.submit >= 0 else "",
                     "" if o.start is None else str(o.start),
                     "" if o.end is None else str(o.end),
                     o.host or "", " ".join(map(str, o.cpus)), o.status.value))
    return rows


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} m"
    return f"{seconds / 3600:.2f} h"


def parse_mib(text: str) -> int:
    """'64G' / '64GiB' -> 65536, '512M' / '512' -> 512 (MiB)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"G": 1024, "M": 1, "T": 1024 * 1024}.get(value[-1:])
    if scale is None:
        return int(value)
    return int(float(value[:-1]) * scale)


def positive_count(text: str) -> int:
    """A whole number >= 1, for argparse (also the benchmarks' argument type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _seconds(text: str) -> int:
    """A whole number of seconds >= 0, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds (0 or more)")
    return value


def _size(text: str) -> int:
    """A memory size such as 64G or 65536 (MiB), for argparse."""
    try:
        value = parse_mib(text)
    except (ValueError, OverflowError):  # "12Q", "G", "nanG"; "infG"
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 64G or 65536 (MiB)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: one line on stderr, exit 2 (argparse would add the whole usage)."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m placement.sim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay an SWF trace over a synthetic cluster with FIFO + EASY backfill.",
        epilog="examples:\n"
               "  python -m placement.sim trace.swf --hosts 8 --nodes-per-host 2 "
               "--cores-per-node 16 --mem-per-node 64G --policy all\n"
               "  python -m placement.sim trace.swf --hosts 1 --nodes-per-host 1 "
               "--cores-per-node 128 --policy pack --jobs-csv starts.csv\n"
               "  python -m placement.sim trace.swf --policy pack --borrow --lend-after-s 600 "
               "--give-back-s 5",
    )
    parser.add_argument("trace", help="SWF file (Parallel Workloads Archive format)")
    parser.add_argument("--hosts", type=positive_count, default=8)
    parser.add_argument("--nodes-per-host", type=positive_count, default=2)
    parser.add_argument("--cores-per-node", type=positive_count, default=16)
    parser.add_argument("--mem-per-node", type=_size, default=65536,
                        help="memory per NUMA node, e.g. 64G or 65536 (MiB)")
    parser.add_argument("--policy", choices=(*POLICIES, "all"), default="all")
    parser.add_argument("--plan-steps", type=positive_count, default=200,
                        help="search bound of each plan_to_fit attempt (pack+migrate)")
    borrowing = parser.add_argument_group(
        "borrowing (docs/borrowing.md)",
        "--borrow replays each policy twice, without and with borrowing, side by side")
    borrowing.add_argument("--borrow", action="store_true",
                           help="small jobs borrow cores running jobs hold and leave idle")
    borrowing.add_argument("--borrow-max-cpus", type=positive_count, default=4, metavar="N",
                           help="jobs asking for at most N processors borrow (default 4)")
    borrowing.add_argument("--lend-after-s", type=_seconds, default=600, metavar="S",
                           help="an owner's core is lent once idle S seconds (default 600)")
    borrowing.add_argument("--give-back-s", type=_seconds, default=5, metavar="S",
                           help="a borrower leaves a wanted core within S seconds (default 5)")
    borrowing.add_argument("--migrate-s", type=_seconds, default=30, metavar="S",
                           help="run time a borrower loses to a migration (default 30)")
    borrowing.add_argument("--checkpoint-s", type=_seconds, default=60, metavar="S",
                           help="time to save a borrower's checkpoint (default 60)")
    borrowing.add_argument("--restore-s", type=_seconds, default=60, metavar="S",
                           help="run time a borrower loses to a restore (default 60)")
    parser.add_argument("--jobs-csv", metavar="FILE",
                        help="write one row per job (job,submit,start,end,host,cpus,status; "
                             "status ran|rejected|skipped) for a single --policy")
    args = parser.parse_args(argv)
    if args.jobs_csv is not None and args.policy == "all":
        parser.error("--jobs-csv writes one policy's jobs: give --policy too")
    if args.jobs_csv is not None and args.borrow:
        parser.error("--jobs-csv writes a replay without borrowing: leave out --borrow")
    # The only I/O in placement/: reading the trace the user named, writing the CSV asked for.
    try:
        with open(args.trace, encoding="utf-8", errors="replace") as handle:
            trace = parse_swf(handle)
    except OSError as e:
        parser.error(f"cannot read {args.trace}: {e.strerror}")
    if not trace.jobs and trace.malformed:
        # Every line malformed: another file given by mistake, not an empty workload.
        parser.error(f"{args.trace} is not an SWF trace: no job lines, "
                     f"{len(trace.malformed)} malformed (first: line {trace.malformed[0]})")
    policies = POLICIES if args.policy == "all" else (args.policy,)
    if args.borrow:
        return _borrow_main(args, trace, policies)
    results = []
    for policy in policies:
        config = SimConfig(args.hosts, args.nodes_per_host, args.cores_per_node,
                           args.mem_per_node, policy, args.plan_steps)
        jobs, skipped = jobs_from_trace(trace, config)
        results.append(simulate(jobs, config, skipped))
    first = results[0]
    print(f"{args.trace}: {len(trace.jobs)} jobs ({first.skipped} without size or run time, "
          f"{len(trace.malformed)} malformed lines); cluster {args.hosts} hosts x "
          f"{args.nodes_per_host} nodes x {args.cores_per_node} cores, "
          f"{args.mem_per_node} MiB per node")
    print(format_table(results))
    if args.jobs_csv is not None:
        try:
            with open(args.jobs_csv, "w", encoding="utf-8", newline="") as out:
                csv.writer(out).writerows(csv_rows(first.outcomes))
        except OSError as e:
            print(f"python -m placement.sim: cannot write {args.jobs_csv}: {e.strerror}",
                  file=sys.stderr)
            return 1
    return 0


def _borrow_main(args: argparse.Namespace, trace: Trace, policies: Sequence[str]) -> int:
    # Imported here: placement.borrowsim builds on this module.
    from placement.borrowsim import BorrowConfig, compare, format_comparison

    borrow = BorrowConfig(args.borrow_max_cpus, args.lend_after_s, args.give_back_s,
                          args.migrate_s, args.checkpoint_s, args.restore_s)
    rows = []
    for policy in policies:
        config = SimConfig(args.hosts, args.nodes_per_host, args.cores_per_node,
                           args.mem_per_node, policy, args.plan_steps)
        jobs, skipped = jobs_from_trace(trace, config)
        before, after, _ = compare(jobs, config, borrow)
        rows += [before, after]
    print(f"{args.trace}: {len(trace.jobs)} jobs ({len(skipped)} without size or run time, "
          f"{len(trace.malformed)} malformed lines); cluster {args.hosts} hosts x "
          f"{args.nodes_per_host} nodes x {args.cores_per_node} cores, "
          f"{args.mem_per_node} MiB per node")
    print(f"borrowers: jobs of at most {borrow.max_cpus} processors on one node; lend after "
          f"{borrow.lend_after_s} s idle; give back within {borrow.give_back_s} s; migrate "
          f"{borrow.migrate_s} s, checkpoint {borrow.checkpoint_s} s, restore "
          f"{borrow.restore_s} s")
    print(format_comparison(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
