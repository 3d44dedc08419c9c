"""The queue's policy: FIFO within priority, with EASY backfill. Pure: no store, no libvirt.

One pass over a snapshot of the cluster decides which queued jobs start now and, for each one
that waits, why. Jobs start in order while the first one fits. The first job that does not
fit is the *head*: from the running jobs' time limits the pass computes the *shadow time*, the
latest moment at which the head will fit, and the cluster as it will be then. A later job may
start early (backfill) only if it cannot delay the head: it ends before the shadow time (it has
a `--time-limit`), or the head, re-placed on the cluster as it will be at the shadow time,
still fits with the later job still running. So a large job at the head is never starved by a
stream of small ones. The reservation is `placement.backfill`'s, which the trace simulator
shares.

A gang (`--nodes N`, `vmjobs.gang`) waits as one job: its members, queued as separate rows,
are gathered into one entry at the first member's place (`group_gangs`), placed all together
or not at all (`placement.gang.place_gang`), counted whole for the head's reservation (the
shadow time is when every member fits) and for backfill (all members admitted or none). A
gang's wait is returned once, under the gang's id; `Plan.member_waits` gives it per member.

A job of an array with a limit (`--array 1-100%10`) whose array already runs that many jobs
is *held*: it waits with that reason, is passed over (never the head, never blocking anyone
behind it) and is looked at again in the next pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import placement
from placement import Allocation, Request
from placement.backfill import Head, Holding, Reservation, reserve_head
from placement.gang import place_gang

__all__ = ["Holding", "Plan", "Planner", "Start", "Wait", "Waiting", "group_gangs", "order",
           "plan"]


@dataclass(frozen=True)
class Waiting:
    """A queued job, in submission order."""

    job_id: str
    request: Request
    time_limit_s: float | None = None
    array: str | None = None  # the id of its job array, if any
    array_limit: int | None = None  # at most this many of the array running (`%N`)
    gang: str | None = None  # a member of this gang (before `group_gangs`)
    # a whole gang (after `group_gangs`): its queued members (job id, request), by index;
    # `job_id` is then the gang's id and `request` its first member's (for its priority)
    members: tuple[tuple[str, Request], ...] = ()

    def requests(self) -> tuple[Request, ...]:
        return tuple(r for _, r in self.members) if self.members else (self.request,)


@dataclass(frozen=True)
class Start:
    job_id: str
    allocation: Allocation
    backfilled: bool = False


@dataclass(frozen=True)
class Wait:
    job_id: str
    position: int  # 1 = the head, unless `held`
    reason: str
    held: bool = False  # by its array's limit, not by room: nothing to make room for


@dataclass(frozen=True)
class Plan:
    starts: tuple[Start, ...]
    waits: tuple[Wait, ...]
    shadow: float | None = None  # when the head will fit at the latest, when known

    def member_waits(self, gangs: Mapping[str, Sequence[str]]) -> dict[str, Wait]:
        """Every wait by job id, a gang's wait repeated for each of its members (`gangs`: gang
        id -> member ids, as `group_gangs` made them)."""
        out: dict[str, Wait] = {}
        for wait in self.waits:
            for job_id in gangs.get(wait.job_id, (wait.job_id,)):
                out[job_id] = replace(wait, job_id=job_id)
        return out


def order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """Higher priority first; submission order within a priority (sorted() is stable)."""
    return sorted(waiting, key=lambda w: -w.request.priority)


def group_gangs(queue: Sequence[Waiting]) -> list[Waiting]:
    """The queue with each gang's members gathered into one entry at its first member's place
    (members in their order in `queue`, which is index order for members queued together).
    Entries of no gang are kept as they are. O(len(queue))."""
    members: dict[str, list[Waiting]] = {}
    for job in queue:
        if job.gang is not None:
            members.setdefault(job.gang, []).append(job)
    out: list[Waiting] = []
    for job in queue:
        if job.gang is None:
            out.append(job)
        elif job.gang in members:
            group = members.pop(job.gang)
            # the gang holds its hosts until its longest member ends: no limit if one has none
            limits = [m.time_limit_s for m in group if m.time_limit_s is not None]
            limit = max(limits) if len(limits) == len(group) else None
            out.append(Waiting(job.gang, group[0].request, limit,
                               members=tuple((m.job_id, m.request) for m in group)))
    return out


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


Holders = Sequence[Holding] | Callable[[], Sequence[Holding]]


def plan(cluster: placement.Cluster, waiting: Sequence[Waiting], holding: Holders,
         now: float, policy: str = "pack", running: Mapping[str, int] | None = None) -> Plan:
    """Which queued jobs start now, and why each of the others waits. `cluster` is not changed.
    `holding` (who holds what until when) may be given as a function: it is only needed, and
    only called, when some job does not fit. `running`: array id -> how many of its jobs hold
    resources now (for `%N` limits)."""
    return Planner(cluster, holding, policy, running).offer(group_gangs(order(waiting)), now)


class Planner:
    """One scheduling pass, which can be carried on later with jobs added to the queue's end.

    State guarded: a working copy of the cluster with this pass's starts reserved in it, the
    head and its reservation once a job did not fit, the reasons of requests refused so far,
    and how many jobs of each array run. If the cluster has not changed since (nothing
    released, no host up or down), offering the jobs submitted meanwhile gives the same
    decisions as planning the whole queue again — the jobs before them are decided the same
    way, on the same cluster — at the cost of the new jobs alone (`offer`). Pure: no store, no
    clock (`now` is given).

    Positions in line: the head is 1, then every other waiting job in queue order. Jobs held
    by their array's limit before any head is known are numbered after it once it is, so an
    `offer` that finds the head also returns those held jobs again, renumbered.
    """

    def __init__(self, cluster: placement.Cluster, holding: Holders, policy: str = "pack",
                 running: Mapping[str, int] | None = None) -> None:
        self.cluster = cluster.copy()
        self.policy = policy
        self._holding = holding
        self.limits = _ArrayLimits(running or {})
        self.holders: list[Holding] | None = None  # read when a head is found
        self.pending: list[Holding] = []  # this pass's starts, holders from now on
        self.decided: list[str] = []  # every job offered, in queue order
        self.waits = 0  # positions handed out
        self.held_early: list[Wait] = []  # held by their array's limit before any head
        self.head: Waiting | None = None
        self.reservation: Reservation | None = None
        # The cluster only fills up during a pass, so a request that did not fit still does
        # not: a long queue of alike jobs costs one placement, not one each.
        self.refused: dict[Head, str] = {}

    def offer(self, queue: Sequence[Waiting], now: float) -> Plan:
        """Decide `queue` (in queue order, after every job offered before): the starts and
        waits among them (and held jobs renumbered, see the class)."""
        starts: list[Start] = []
        waits: list[Wait] = []
        for job in queue:
            self.decided.append(job.job_id)
            if (reason := self.limits.holds(job)) is not None:
                held = Wait(job.job_id, 0, reason, held=True)
                if self.head is None:
                    self.held_early.append(held)
                else:
                    waits.append(self._number(held))
                continue
            if self.head is None:
                allocations, _why = self._place(job)
                if allocations is not None:
                    for (job_id, request), allocation in zip(self._units(job), allocations,
                                                             strict=True):
                        self.cluster.reserve(job_id, allocation, request)
                        starts.append(Start(job_id, allocation))
                        self.pending.append(Holding(job_id, _ends(job, now)))
                    self.limits.started(job)
                    continue
                self.waits = 0  # only held jobs were numbered so far: the head goes first
                waits.append(self._make_head(job, now))
                waits.extend(self._number(w) for w in self.held_early)
                self.held_early = []
                continue
            wait = self._backfill(job, now)
            if isinstance(wait, Wait):
                waits.append(wait)
            else:
                starts.extend(wait)
        if self.head is None and self.held_early:
            self.waits = 0
            waits.extend(self._number(w) for w in self.held_early)
        shadow = self.reservation.shadow if self.reservation is not None else None
        return Plan(tuple(starts), tuple(waits), shadow)

    @staticmethod
    def _units(job: Waiting) -> tuple[tuple[str, Request], ...]:
        """What is placed for a queue entry: (job id, request) of the job, or of each member."""
        return job.members or ((job.job_id, job.request),)

    @staticmethod
    def _head_of(job: Waiting) -> Head:
        return job.requests() if job.members else job.request

    def _place(self, job: Waiting) -> tuple[tuple[Allocation, ...] | None, str]:
        """The allocations of the job (a gang: of all its members, or none) and, when it does
        not fit, why."""
        if not job.members:
            decision = self.cluster.place(job.request, self.policy)
            if decision.allocation is None:
                return None, decision.explanation.summary
            return (decision.allocation,), ""
        gang = place_gang(self.cluster, job.requests(), self.policy,
                          names=[job_id for job_id, _ in job.members])
        return gang.allocations, gang.reason

    def _make_head(self, head: Waiting, now: float) -> Wait:
        holding = self._holding() if callable(self._holding) else self._holding
        self.holders = [*holding, *self.pending]
        self.head = head
        self.reservation = reserve_head(self.cluster, self._head_of(head), self.holders, now,
                                        self.policy)
        why = self.cluster.explain(head.request).summary if not head.members else \
            f"gang of {len(head.members)}: {self._place(head)[1]}"
        if self.reservation.shadow is not None:
            why += f"; starts by {_clock(self.reservation.shadow)} at the latest"
        return self._wait(head, f"first in line: {why}")

    def _backfill(self, job: Waiting, now: float) -> list[Start] | Wait:
        assert self.head is not None and self.reservation is not None
        key = self._head_of(job)
        if key in self.refused:
            return self._wait(job, self.refused[key])
        allocations, why = self._place(job)
        if allocations is None:
            reason = self.refused[key] = why
        else:
            units = [(job_id, allocation, request) for (job_id, request), allocation
                     in zip(self._units(job), allocations, strict=True)]
            if self.reservation.admits_all(units, _ends(job, now)):
                for job_id, allocation, request in units:
                    self.cluster.reserve(job_id, allocation, request)
                self.limits.started(job)
                return [Start(job_id, allocation, backfilled=True)
                        for job_id, allocation, _ in units]
            reason = _would_delay(job, self.head, self.reservation)
        return self._wait(job, reason)

    def _wait(self, job: Waiting, reason: str) -> Wait:
        return self._number(Wait(job.job_id, 0, reason))

    def _number(self, wait: Wait) -> Wait:
        self.waits += 1
        return replace(wait, position=self.waits)


class _ArrayLimits:
    """How many jobs of each array run, counting those this pass starts."""

    def __init__(self, running: Mapping[str, int]) -> None:
        self.running = dict(running)

    def holds(self, job: Waiting) -> str | None:
        """Why `job` must wait for its array's limit, or None if it may start."""
        if job.array is None or job.array_limit is None:
            return None
        count = self.running.get(job.array, 0)
        if count < job.array_limit:
            return None
        return (f"held by its array's limit: {count} of array {job.array} running, "
                f"at most {job.array_limit} at once (%{job.array_limit})")

    def started(self, job: Waiting) -> None:
        if job.array is not None:
            self.running[job.array] = self.running.get(job.array, 0) + 1


def _ends(job: Waiting, now: float) -> float | None:
    return now + job.time_limit_s if job.time_limit_s is not None else None


def _would_delay(job: Waiting, head: Waiting, reservation: Reservation) -> str:
    if reservation.shadow is None:
        return (f"room now, but it would delay {head.job_id} (first in line), whose start "
                "depends on jobs without a time limit")
    limit = "" if job.time_limit_s is not None else "; a --time-limit would let it start early"
    return (f"room now, but it would delay {head.job_id} (first in line, due by "
            f"{_clock(reservation.shadow)}){limit}")
