"""The queue's policy: FIFO within priority, with EASY backfill. Pure: no store, no libvirt.

One pass over a snapshot of the cluster decides which queued jobs start now and, for each one
that waits, why. Jobs start in order while the first one fits. The first job that does not
fit is the *head*: from the running jobs' time limits the pass computes the *shadow time*, the
latest moment at which the head will fit, and the cluster as it will be then. A later job may
start early (backfill) only if it cannot delay the head: it ends before the shadow time (it has
a `--time-limit`), or the head still fits at the shadow time with the later job still running.
So a large job at the head is never starved by a stream of small ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import placement
from placement import Allocation, Request


@dataclass(frozen=True)
class Waiting:
    """A queued job, in submission order."""

    job_id: str
    request: Request
    time_limit_s: float | None = None


@dataclass(frozen=True)
class Holding:
    """A job that holds resources now, and when it must end at the latest (None: unknown)."""

    job_id: str
    ends_at: float | None


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


@dataclass
class _Shadow:
    at: float | None  # None: the head's start depends on jobs without a time limit
    cluster: placement.Cluster | None  # None: the head waits for hosts, not for jobs


def _shadow(cluster: placement.Cluster, head: Request,
            holding: Sequence[Holding]) -> _Shadow:
    """Release holders in the order they must end until the head fits."""
    sim = cluster.copy()
    held = set(sim.allocations())
    limited = sorted((h for h in holding if h.ends_at is not None and h.job_id in held),
                     key=lambda h: h.ends_at or 0.0)
    for holder in limited:
        sim.release(holder.job_id)
        if sim.place(head).fits:
            return _Shadow(holder.ends_at, sim)
    for job_id in sim.allocations():
        sim.release(job_id)
    if sim.place(head).fits:
        return _Shadow(None, sim)
    return _Shadow(None, None)


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
    shadow = _shadow(cluster, head.request, holders)
    why = cluster.explain(head.request).summary
    if shadow.at is not None:
        why += f"; starts by {_clock(shadow.at)} at the latest"
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
        elif _harmless(job, allocation, shadow, head.request, now):
            cluster.reserve(job.job_id, allocation, job.request)
            starts.append(Start(job.job_id, allocation, backfilled=True))
            continue
        else:
            reason = _would_delay(job, head, shadow)
        waits.append(Wait(job.job_id, len(waits) + 1, reason))
    return Plan(tuple(starts), tuple(waits), shadow.at)


def _ends(job: Waiting, now: float) -> float | None:
    return now + job.time_limit_s if job.time_limit_s is not None else None


def _harmless(job: Waiting, allocation: Allocation, shadow: _Shadow, head: Request,
              now: float) -> bool:
    """May `job` start now without delaying the head? Records it in the shadow if so."""
    if shadow.cluster is None:
        return True  # the head waits for a host to come (back) up; jobs here cannot delay it
    ends = _ends(job, now)
    if shadow.at is not None and ends is not None and ends <= shadow.at:
        return True  # gone before the head is due
    trial = shadow.cluster.copy()
    trial.reserve(job.job_id, allocation, job.request)
    if not trial.place(head).fits:
        return False
    shadow.cluster = trial  # later backfill candidates must leave room alongside this one
    return True


def _would_delay(job: Waiting, head: Waiting, shadow: _Shadow) -> str:
    if shadow.at is None:
        return (f"room now, but it would delay {head.job_id} (first in line), whose start "
                "depends on jobs without a time limit")
    limit = "" if job.time_limit_s is not None else "; a --time-limit would let it start early"
    return (f"room now, but it would delay {head.job_id} (first in line, due by "
            f"{_clock(shadow.at)}){limit}")
