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

A job of an array with a limit (`--array 1-100%10`) whose array already runs that many jobs
is *held*: it waits with that reason, is passed over (never the head, never blocking anyone
behind it) and is looked at again in the next pass.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import placement
from placement import Allocation, Request
from placement.backfill import Holding, Reservation, reserve_head

__all__ = ["Holding", "Plan", "Start", "Wait", "Waiting", "order", "plan"]


@dataclass(frozen=True)
class Waiting:
    """A queued job, in submission order."""

    job_id: str
    request: Request
    time_limit_s: float | None = None
    array: str | None = None  # the id of its job array, if any
    array_limit: int | None = None  # at most this many of the array running (`%N`)


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


def order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """Higher priority first; submission order within a priority (sorted() is stable)."""
    return sorted(waiting, key=lambda w: -w.request.priority)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def plan(cluster: placement.Cluster, waiting: Sequence[Waiting], holding: Sequence[Holding],
         now: float, policy: str = "pack", running: Mapping[str, int] | None = None) -> Plan:
    """Which queued jobs start now, and why each of the others waits. `cluster` is not changed.

    `running`: array id -> how many of its jobs hold resources now (for `%N` limits).
    """
    cluster = cluster.copy()
    holders = list(holding)
    queue = order(waiting)
    limits = _ArrayLimits(running or {})
    starts: list[Start] = []
    held: list[tuple[int, Wait]] = []  # (place in the queue, why it waits)
    i = 0
    while i < len(queue):
        job = queue[i]
        if (reason := limits.holds(job)) is not None:
            held.append((i, Wait(job.job_id, 0, reason, held=True)))
            i += 1
            continue
        decision = cluster.place(job.request, policy)
        if decision.allocation is None:
            break
        cluster.reserve(job.job_id, decision.allocation, job.request)
        starts.append(Start(job.job_id, decision.allocation))
        holders.append(Holding(job.job_id, _ends(job, now)))
        limits.started(job)
        i += 1
    if i == len(queue):
        return Plan(tuple(starts), _numbered([], held))

    head = queue[i]
    reservation = reserve_head(cluster, head.request, holders, now, policy)
    why = cluster.explain(head.request).summary
    if reservation.shadow is not None:
        why += f"; starts by {_clock(reservation.shadow)} at the latest"
    waits: list[tuple[int, Wait]] = []
    # The cluster only fills up during this loop, so a request that did not fit still does
    # not: a long queue of alike jobs costs one placement, not one each.
    refused: dict[Request, str] = {}
    for at, job in enumerate(queue[i + 1:], start=i + 1):
        if (reason := limits.holds(job)) is not None:
            waits.append((at, Wait(job.job_id, 0, reason, held=True)))
            continue
        if job.request in refused:
            waits.append((at, Wait(job.job_id, 0, refused[job.request])))
            continue
        decision = cluster.place(job.request, policy)
        allocation = decision.allocation
        if allocation is None:
            reason = refused[job.request] = decision.explanation.summary
        elif reservation.admits(job.job_id, allocation, job.request, _ends(job, now)):
            cluster.reserve(job.job_id, allocation, job.request)
            starts.append(Start(job.job_id, allocation, backfilled=True))
            limits.started(job)
            continue
        else:
            reason = _would_delay(job, head, reservation)
        waits.append((at, Wait(job.job_id, 0, reason)))
    first = Wait(head.job_id, 1, f"first in line: {why}")
    return Plan(tuple(starts), _numbered([first], held + waits), reservation.shadow)


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


def _numbered(first: list[Wait], rest: list[tuple[int, Wait]]) -> tuple[Wait, ...]:
    """Positions in line: the head (if any) first, then the others in queue order."""
    ordered = first + [w for _, w in sorted(rest, key=lambda pair: pair[0])]
    return tuple(Wait(w.job_id, n, w.reason, w.held) for n, w in enumerate(ordered, start=1))


def _ends(job: Waiting, now: float) -> float | None:
    return now + job.time_limit_s if job.time_limit_s is not None else None


def _would_delay(job: Waiting, head: Waiting, reservation: Reservation) -> str:
    if reservation.shadow is None:
        return (f"room now, but it would delay {head.job_id} (first in line), whose start "
                "depends on jobs without a time limit")
    limit = "" if job.time_limit_s is not None else "; a --time-limit would let it start early"
    return (f"room now, but it would delay {head.job_id} (first in line, due by "
            f"{_clock(reservation.shadow)}){limit}")
