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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


@dataclass(frozen=True)
class Start:
    job_id: str
    allocation: Allocation
    backfilled: bool = False


@dataclass(frozen=True)
class Wait:
    job_id: str
    position: int  # 1 = the head
    reason: str


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
         now: float, policy: str = "pack") -> Plan:
    """Which queued jobs start now, and why each of the others waits. `cluster` is not changed."""
    cluster = cluster.copy()
    holders = list(holding)
    queue = order(waiting)
    starts: list[Start] = []
    i = 0
    while i < len(queue):
        job = queue[i]
        decision = cluster.place(job.request, policy)
        if decision.allocation is None:
            break
        cluster.reserve(job.job_id, decision.allocation, job.request)
        starts.append(Start(job.job_id, decision.allocation))
        holders.append(Holding(job.job_id, _ends(job, now)))
        i += 1
    if i == len(queue):
        return Plan(tuple(starts), ())

    head = queue[i]
    reservation = reserve_head(cluster, head.request, holders, now, policy)
    why = cluster.explain(head.request).summary
    if reservation.shadow is not None:
        why += f"; starts by {_clock(reservation.shadow)} at the latest"
    waits = [Wait(head.job_id, 1, f"first in line: {why}")]
    # The cluster only fills up during this loop, so a request that did not fit still does
    # not: a long queue of alike jobs costs one placement, not one each.
    refused: dict[Request, str] = {}
    for job in queue[i + 1:]:
        if job.request in refused:
            waits.append(Wait(job.job_id, len(waits) + 1, refused[job.request]))
            continue
        decision = cluster.place(job.request, policy)
        allocation = decision.allocation
        if allocation is None:
            reason = refused[job.request] = decision.explanation.summary
        elif reservation.admits(job.job_id, allocation, job.request, _ends(job, now)):
            cluster.reserve(job.job_id, allocation, job.request)
            starts.append(Start(job.job_id, allocation, backfilled=True))
            continue
        else:
            reason = _would_delay(job, head, reservation)
        waits.append(Wait(job.job_id, len(waits) + 1, reason))
    return Plan(tuple(starts), tuple(waits), reservation.shadow)


def _ends(job: Waiting, now: float) -> float | None:
    return now + job.time_limit_s if job.time_limit_s is not None else None


def _would_delay(job: Waiting, head: Waiting, reservation: Reservation) -> str:
    if reservation.shadow is None:
        return (f"room now, but it would delay {head.job_id} (first in line), whose start "
                "depends on jobs without a time limit")
    limit = "" if job.time_limit_s is not None else "; a --time-limit would let it start early"
    return (f"room now, but it would delay {head.job_id} (first in line, due by "
            f"{_clock(reservation.shadow)}){limit}")
