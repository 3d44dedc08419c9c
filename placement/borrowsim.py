"""Borrowing in the trace simulator: small jobs run on cores that running jobs hold and leave
idle, and move off when the owner wants them back (docs/borrowing.md, issue 13 part 4).

Two layers share the cluster. Owners — every job that does not borrow — are replayed exactly
as `placement.sim` replays a trace (FIFO + EASY backfill, the chosen policy), as if borrowers
did not exist: the owners' cluster holds only owners. Borrowers run in what owners leave: free
cores, and the idle cores of owners in their serial phase (`placement.lending`), once idle for
`lend_after_s`. A core holds at most its owner and one borrower. When an owner wants a core a
borrower sits on — its parallel phase begins, or it starts on a free core a borrower took, or
a migration under `+migrate` moves it there — the borrower gives it back: it is migrated to
cores available then (costing `migrate_s` more run time), else checkpointed (`checkpoint_s`
later it may restart anywhere, costing `restore_s`). Borrowers run at idle priority on lent
cores (the daemon's side, not built yet, is to do so with cgroup cpu weights), so an owner
never waits for one: at most, for the `give_back_s` a borrower takes to leave, the owner
shares the cores it took back. `owner delay` bounds that cost as if the sharing were fair
(half of each contended core for `give_back_s`, a bulk-synchronous owner going at the pace of
its slowest core). Memory is not modelled for borrowers (the HPC2N excerpt records no
requested memory; the daemon's rule is that a borrower never takes memory an owner may need).

Which jobs borrow: those asking for at most `max_cpus` processors that fit one NUMA node.
Borrowers lend nothing. Borrowers wait in their own FIFO queue, each starting as soon as it
fits (no reservation: a preemptible job's reservation would protect nothing), on lent cores
first (free cores are where owners start), first host, node and cpu first.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from placement.lending import owner_use
from placement.model import Allocation, NumaPolicy
from placement.sim import (
    TAU,
    Outcome,
    SimConfig,
    SimJob,
    Status,
    _duration,
    _percentile,
    _Simulation,
    simulate,
)


@dataclass(frozen=True)
class BorrowConfig:
    max_cpus: int = 4  # jobs asking for at most this many processors (on one node) borrow
    lend_after_s: int = 600  # an owner's core is lent once idle this long (borrow.for)
    give_back_s: int = 5  # a borrower is off an owner's core this long after it is wanted
    migrate_s: int = 30  # a give-back by live migration: run time the borrower loses
    checkpoint_s: int = 60  # saving a checkpoint: the borrower may restart this much later
    restore_s: int = 60  # restoring it: run time added when it restarts


def borrows(job: SimJob, config: BorrowConfig) -> bool:
    """Is `job` a borrower under `config`?"""
    return job.request.cpus <= config.max_cpus and job.request.numa == NumaPolicy.STRICT


class Why(StrEnum):
    """Why an owner wanted a core a borrower was on."""

    RECLAIM = "reclaim"  # the owner's serial phase ended: it uses all its cores now
    START = "start"  # the owner started on a free core the borrower had taken
    MOVE = "move"  # a running owner was migrated or re-pinned there (+migrate)


@dataclass(frozen=True)
class GiveBack:
    """One give-back: at `time` the borrower left cores an owner wanted."""

    time: int
    borrower: str
    owners: tuple[str, ...]  # owners that wanted cores back
    why: Why  # the first that applies to any of them: reclaim, start, move
    migrated: bool  # False: checkpointed
    cpus: tuple[tuple[str, int], ...]  # (host, cpu) it left
    to: tuple[tuple[str, int], ...] = ()  # (host, cpu) it went to when migrated


@dataclass(frozen=True)
class Interval:
    """A borrower on (host, cpu)s from `start` to `end` (seconds)."""

    borrower: str
    cpus: tuple[tuple[str, int], ...]
    start: int
    end: int


@dataclass(frozen=True)
class BorrowResult:
    """One replay with borrowing. `owners` is the owner layer as `placement.sim` gives it."""

    owners: tuple[Outcome, ...]  # every owner job: ran / rejected, in submit order
    # start: first start; end: when its work was done; host and cpus: where it finished.
    borrowers: tuple[Outcome, ...]
    give_backs: tuple[GiveBack, ...]
    intervals: tuple[Interval, ...]  # where borrowers ran, for checking
    lends: tuple[tuple[str, int, int], ...]  # (owner, from, until): its idle cores lendable
    held_core_s: float  # core-seconds held by owners, plus borrowers on cores no owner held
    lent_core_s: float  # core-seconds borrowers ran on owners' idle cores
    first: int
    last: int
    total_cores: int
    # (owner, bound) for owners that wanted cores back: give_back_s / 2 per time they did.
    owner_delay_s: tuple[tuple[str, float], ...]
    elapsed_s: float = field(default=0.0, compare=False)


@dataclass
class _Borrower:
    job: SimJob
    remaining: int  # seconds of work left, restore cost included when restarting
    ready_at: int  # may start from this time (after a checkpoint is saved)
    cpus: tuple[tuple[str, int], ...] = ()
    since: int = 0
    end: int = 0
    first_start: int | None = None


Core = tuple[str, int]


class _BorrowSimulation(_Simulation):
    """The owner replay of `placement.sim`, with borrowers run in its hooks.

    State guarded: which borrower sits on which core (`loans`; one per core), the borrowers'
    queue, and when each running owner's idle cores may be lent.
    """

    def __init__(self, config: SimConfig, borrow: BorrowConfig,
                 borrowers: Sequence[SimJob]) -> None:
        super().__init__(config)
        self.borrow = borrow
        self.arriving = list(borrowers)
        self.next_arrival = 0
        self.waiting: list[_Borrower] = []  # in submit order
        self.on: dict[str, _Borrower] = {}
        self.loans: dict[Core, str] = {}
        self.lend_window: dict[str, tuple[int, int]] = {}  # owner -> absolute [from, until)
        self.lends: list[tuple[str, int, int]] = []
        self.wake: list[int] = [j.submit for j in borrowers]
        heapq.heapify(self.wake)
        self.give_backs: list[GiveBack] = []
        self.intervals: list[Interval] = []
        self.outcomes_b: dict[str, Outcome] = {}
        self.rejected_b: list[Outcome] = []
        self.contended: set[tuple[str, int]] = set()  # (owner, time) of its give-backs
        self.lent_cores = 0
        self.unheld_cores = 0
        self.lent_core_s = 0.0
        self.unheld_core_s = 0.0
        self.last_end = 0
        self.node_of: dict[Core, int] = {
            (host.name, cpu.id): node.id
            for host in self.cluster.hosts.values() for node in host.nodes for cpu in node.cpus}
        self.cores: list[Core] = list(self.node_of)

    # -- hooks ---------------------------------------------------------------------------------

    def _next_event(self) -> float:
        return self.wake[0] if self.wake else math.inf

    def _advance(self, seconds: int) -> None:
        self.lent_core_s += self.lent_cores * seconds
        self.unheld_core_s += self.unheld_cores * seconds

    def _start(self, job: SimJob, alloc: Allocation, now: int, backfilled: bool = False) -> None:
        super()._start(job, alloc, now, backfilled)
        window = owner_use(job.request.cpus, job.used_cpus, job.run).lendable(
            self.borrow.lend_after_s)
        if window is not None:
            self.lend_window[job.id] = (now + window[0], now + window[1])
            self.lends.append((job.id, now + window[0], now + window[1]))
            heapq.heappush(self.wake, now + window[0])
            heapq.heappush(self.wake, now + window[1])

    def _after(self, now: int) -> None:
        while self.wake and self.wake[0] <= now:
            heapq.heappop(self.wake)
        for borrower in [b for b in self.on.values() if b.end == now]:
            self._stop(borrower, now)
            self.outcomes_b[borrower.job.id] = Outcome(
                borrower.job.id, borrower.job.submit, Status.RAN, borrower.first_start, now,
                borrower.cpus[0][0], tuple(c for _, c in borrower.cpus))
            del self.on[borrower.job.id]
            self.last_end = max(self.last_end, now)
        while (self.next_arrival < len(self.arriving)
               and self.arriving[self.next_arrival].submit <= now):
            job = self.arriving[self.next_arrival]
            self.next_arrival += 1
            if self._ever_fits(job.request):
                self.waiting.append(_Borrower(job, job.run, job.submit))
            else:
                self.rejected_b.append(Outcome(job.id, job.submit, Status.REJECTED))
        holders = self._holders()
        self._give_back(now, holders)
        self._start_waiting(now, holders)
        self.lent_cores = sum(1 for core in self.loans if core in holders)
        self.unheld_cores = len(self.loans) - self.lent_cores

    # -- the borrower layer --------------------------------------------------------------------

    def _holders(self) -> dict[Core, str]:
        return {(r.allocation.host, cpu): job_id for job_id, r in self.running.items()
                for cpu in r.allocation.cpus}

    def _available(self, core: Core, holders: dict[Core, str], now: int) -> bool | None:
        """None: a borrower may not use `core` now; True: an owner's idle core; False: free."""
        owner = holders.get(core)
        if owner is None:
            return False
        since, until = self.lend_window.get(owner, (0, 0))
        if since <= now < until and core[1] != self.running[owner].allocation.cpus[0]:
            return True
        return None

    def _give_back(self, now: int, holders: dict[Core, str]) -> None:
        for borrower in sorted(self.on.values(), key=lambda b: b.job.id):
            wanted = [c for c in borrower.cpus if self._available(c, holders, now) is None]
            if not wanted:
                continue
            owners = tuple(sorted({holders[c] for c in wanted}))
            # Fair sharing for give_back_s, the owner at the pace of its slowest core: once per
            # owner and time, however many borrowers leave it then.
            self.contended.update((owner, now) for owner in owners)
            why = (Why.RECLAIM if any(self.lend_window.get(o, (0, 0))[1] == now for o in owners)
                   else Why.START if any(self.running[o].start == now for o in owners)
                   else Why.MOVE)
            left = borrower.cpus
            self._stop(borrower, now)
            borrower.remaining = borrower.end - now
            target = self._fit(borrower.job, now, holders)
            if target is not None:
                borrower.remaining += self.borrow.migrate_s
                self._run(borrower, target, now)
                self.give_backs.append(GiveBack(now, borrower.job.id, owners, why, True, left,
                                                target))
                continue
            del self.on[borrower.job.id]
            borrower.remaining += self.borrow.restore_s
            borrower.ready_at = now + self.borrow.checkpoint_s
            heapq.heappush(self.wake, borrower.ready_at)
            self.waiting.append(borrower)
            self.waiting.sort(key=lambda b: (b.job.submit, b.job.id))
            self.give_backs.append(GiveBack(now, borrower.job.id, owners, why, False, left))

    def _start_waiting(self, now: int, holders: dict[Core, str]) -> None:
        for borrower in list(self.waiting):
            if borrower.ready_at > now:
                continue
            target = self._fit(borrower.job, now, holders)
            if target is None:
                continue
            self.waiting.remove(borrower)
            if borrower.first_start is None:
                borrower.first_start = now
            self.on[borrower.job.id] = borrower
            self._run(borrower, target, now)

    def _fit(self, job: SimJob, now: int, holders: dict[Core, str]) -> tuple[Core, ...] | None:
        """The cores `job` would borrow now: on one node, lent cores before free ones, first
        host, node and cpu first; None when no node has enough."""
        lent: dict[tuple[str, int], list[Core]] = {}
        free: dict[tuple[str, int], list[Core]] = {}
        for core in self.cores:
            if core in self.loans:
                continue
            kind = self._available(core, holders, now)
            if kind is None:
                continue
            (lent if kind else free).setdefault((core[0], self.node_of[core]), []).append(core)
        want = job.request.cpus
        for node in dict.fromkeys([*lent, *free]):
            cores = lent.get(node, []) + free.get(node, [])
            if len(cores) >= want:
                return tuple(cores[:want])
        return None

    def _run(self, borrower: _Borrower, cpus: tuple[Core, ...], now: int) -> None:
        borrower.cpus, borrower.since, borrower.end = cpus, now, now + borrower.remaining
        for core in cpus:
            self.loans[core] = borrower.job.id
        heapq.heappush(self.wake, borrower.end)

    def _stop(self, borrower: _Borrower, now: int) -> None:
        for core in borrower.cpus:
            del self.loans[core]
        if now > borrower.since:
            self.intervals.append(Interval(borrower.job.id, borrower.cpus, borrower.since, now))


def split(jobs: Sequence[SimJob], config: BorrowConfig) -> tuple[list[SimJob], list[SimJob]]:
    """(owners, borrowers), each in the given order."""
    return ([j for j in jobs if not borrows(j, config)], [j for j in jobs if borrows(j, config)])


def simulate_borrowing(jobs: Sequence[SimJob], config: SimConfig,
                       borrow: BorrowConfig) -> BorrowResult:
    """Replay `jobs` (in submit order, as `placement.sim.jobs_from_trace` gives them) with
    borrowing. Owners' outcomes are those `placement.sim.simulate` gives for the owners alone
    (tested); borrowers' `end` is when their work (plus migration and restore costs) was done.
    """
    began = time.perf_counter()
    owners, borrowers = split(jobs, borrow)
    sim = _BorrowSimulation(config, borrow, borrowers)
    first, last = sim.run(owners)
    if borrowers:
        first = min(first, borrowers[0].submit) if owners else borrowers[0].submit
    last = max(last, sim.last_end)
    done = {**sim.outcomes_b, **{o.job: o for o in sim.rejected_b}}
    return BorrowResult(
        owners=tuple(sim.outcomes[j.id] for j in owners),
        borrowers=tuple(done[j.id] for j in borrowers),
        give_backs=tuple(sim.give_backs),
        intervals=tuple(sim.intervals),
        lends=tuple(sim.lends),
        held_core_s=sim.busy_seconds + sim.unheld_core_s,
        lent_core_s=sim.lent_core_s,
        first=first,
        last=last,
        total_cores=sim.total,
        owner_delay_s=tuple(sorted(
            (owner, borrow.give_back_s / 2 * count)
            for owner, count in Counter(owner for owner, _ in sim.contended).items())),
        elapsed_s=time.perf_counter() - began,
    )


# -- figures, with and without borrowing --------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    label: str
    jobs: int  # jobs that ran
    borrowers: int  # of which borrowers
    utilization: float  # held core-seconds / (cores x span), as placement.sim counts it
    lent: float  # core-seconds borrowers ran on owners' idle cores / (cores x span)
    mean_wait_s: float  # first start - submit
    p95_wait_s: float
    bounded_slowdown: float  # mean max(1, (end - submit) / max(run, TAU))
    owners_mean_wait_s: float
    borrowers_mean_wait_s: float
    migrations: int  # give-backs by migration
    checkpoints: int  # give-backs by checkpoint
    reclaims: int  # give-backs of lent cores (the rest: free cores an owner started on, moves)
    owner_delay_s: float  # largest bound on one owner's delay from give-backs
    # Owners that end later than when everyone queued together, and by how much at most: not
    # waiting for borrowers, but EASY is not monotone (fewer jobs queued can delay one).
    owners_later: int = 0
    owners_later_max_s: int = 0
    elapsed_s: float = field(default=0.0, compare=False)


def _figures(label: str, ran: Sequence[Outcome], runs: dict[str, int],
             borrower_ids: set[str], utilization: float, lent: float,
             give_backs: Sequence[GiveBack], owner_delay_s: float, elapsed_s: float) -> Figures:
    """Waits and Feitelson's bounded slowdown (Feitelson, Rudolph, Schwiegelshohn, Sevcik,
    Wong, "Theory and practice in parallel job scheduling", JSSPP 1997: the response time over
    the run time, both at least TAU = 10 s) over the jobs in `ran`."""
    def mean(values: Sequence[int]) -> float:
        return sum(values) / len(values) if values else 0.0

    waits = sorted(o.start - o.submit for o in ran if o.start is not None)
    slow = [max(1.0, (o.end - o.submit) / max(runs[o.job], TAU)) for o in ran
            if o.end is not None]
    owners = [o.start - o.submit for o in ran if o.job not in borrower_ids and o.start is not None]
    lenders = [o.start - o.submit for o in ran if o.job in borrower_ids and o.start is not None]
    return Figures(label, len(ran), sum(1 for o in ran if o.job in borrower_ids), utilization,
                   lent, mean(waits), float(_percentile(waits, 0.95)),
                   sum(slow) / len(slow) if slow else 0.0, mean(owners), mean(lenders),
                   sum(1 for g in give_backs if g.migrated),
                   sum(1 for g in give_backs if not g.migrated),
                   sum(1 for g in give_backs if g.why == Why.RECLAIM), owner_delay_s,
                   elapsed_s=elapsed_s)


def compare(jobs: Sequence[SimJob], config: SimConfig,
            borrow: BorrowConfig) -> tuple[Figures, Figures, BorrowResult]:
    """(without borrowing, with borrowing, the borrowing replay), for the same jobs."""
    base = simulate(jobs, config)
    runs = {j.id: j.run for j in jobs}
    borrower_ids = {j.id for j in jobs if borrows(j, borrow)}
    before = _figures(config.policy, [o for o in base.outcomes if o.status == Status.RAN], runs,
                      borrower_ids, base.utilization, 0.0, (), 0.0, base.elapsed_s)
    result = simulate_borrowing(jobs, config, borrow)
    span = max(result.last - result.first, 1) * result.total_cores
    ran = [o for o in (*result.owners, *result.borrowers) if o.status == Status.RAN]
    after = _figures(f"{config.policy}+borrow", ran, runs, borrower_ids,
                     result.held_core_s / span, result.lent_core_s / span, result.give_backs,
                     max((d for _, d in result.owner_delay_s), default=0.0), result.elapsed_s)
    ends = {o.job: o.end for o in base.outcomes if o.end is not None}
    later = [o.end - ends[o.job] for o in result.owners
             if o.end is not None and o.end > ends[o.job]]
    after = replace(after, owners_later=len(later), owners_later_max_s=max(later, default=0))
    return before, after, result


def format_comparison(rows: Sequence[Figures]) -> str:
    head = (f"{'policy':<20}{'jobs':>6}{'borrow':>8}{'util %':>8}{'lent %':>8}"
            f"{'mean wait':>11}{'p95 wait':>10}{'bsld':>8}{'owners wait':>13}"
            f"{'borrowers wait':>16}{'migrated':>10}{'checkpointed':>14}{'reclaims':>10}"
            f"{'owner delay':>13}{'owners later':>20}"
            f"{'sim s':>8}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.label:<20}{r.jobs:>6}{r.borrowers:>8}{100 * r.utilization:>8.1f}"
            f"{100 * r.lent:>8.2f}{_duration(r.mean_wait_s):>11}{_duration(r.p95_wait_s):>10}"
            f"{r.bounded_slowdown:>8.2f}{_duration(r.owners_mean_wait_s):>13}"
            f"{_duration(r.borrowers_mean_wait_s):>16}{r.migrations:>10}{r.checkpoints:>14}"
            f"{r.reclaims:>10}"
            f"{r.owner_delay_s:>11.1f} s"
            f"{f'{r.owners_later} (max {_duration(r.owners_later_max_s)})':>20}"
            f"{r.elapsed_s:>8.1f}")
    return "\n".join(lines)

