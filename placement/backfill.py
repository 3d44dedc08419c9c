"""EASY backfill's reservation for the head of the queue, shared by the daemon's queue policy
(`vmjobs.daemon.queue`) and the trace simulator (`placement.sim`).

EASY (Lifka, "The ANL/IBM SP scheduling system", JSSPP 1995; as stated by Mu'alem and
Feitelson, "Utilization, predictability, workloads, and user runtime estimates in scheduling
the IBM SP2 with backfilling", IEEE TPDS 12(6), 2001): the first queued job that does not fit
(the *head*) gets a reservation at its *shadow time*, the earliest moment at which it fits if
running jobs end by their estimates; the processors free then beyond what the head needs are
the *extra* ones. A later job may start now (backfill) if it fits now and either ends by the
shadow time, or uses only extra processors, so that the head still starts at its shadow time.

On a topology (hosts, NUMA nodes, NICs, memory) "extra processors" is not a number: which
cpus the head takes then is not decided now. So the second test is made by re-placing the
head on the cluster as projected to the shadow time with the candidate (and every earlier
long backfill) held; if the head still fits, the candidate only used what the head can spare.
On a flat cluster (one node, processors only) this is exactly textbook EASY; a property test
checks it against a reference implementation (tests/placement/test_easy.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from placement.cluster import Cluster
from placement.errors import Conflict, UnknownJob
from placement.model import Allocation, Request


@dataclass(frozen=True)
class Holding:
    """A job holding resources now, and when it ends at the latest (seconds on the caller's
    clock; None: unknown, e.g. a job without a time limit)."""

    job_id: str
    ends_at: float | None


class Reservation:
    """The head's reservation in one scheduling pass, and the cluster projected to its start.

    State guarded: the projected cluster, into which every admitted candidate that runs past
    the shadow time is reserved, so that later candidates must leave the head its room beside
    the earlier ones. Built by `reserve_head`; use for one pass only.
    """

    def __init__(self, head: Request, shadow: float | None, projected: Cluster | None,
                 policy: str) -> None:
        self.head = head
        # When the head starts at the latest (seconds); None when that depends on jobs without
        # an end time (the head then fits only once every holder is gone).
        self.shadow = shadow
        # The cluster at the shadow time without the head (every holder ending by then
        # released); None when the head does not fit even on the emptied cluster (it waits for
        # a host to come up), so nothing started now can delay it.
        self.projected = projected
        self.policy = policy

    def admits(self, job_id: str, allocation: Allocation, request: Request,
               ends_at: float | None) -> bool:
        """May a job start now on `allocation` (free now) without delaying the head?

        True if it ends by the shadow time, or if the head still fits at the shadow time with
        the job held there (then the job stays held in the projected cluster). `ends_at` is
        the job's latest end (None: unknown, so it is taken to run past any shadow time).
        """
        if self.projected is None:
            return True
        if self.shadow is not None and ends_at is not None and ends_at <= self.shadow:
            return True  # gone before the head is due: the head's room is untouched
        try:
            self.projected.reserve(job_id, allocation, request)
        except Conflict:
            return False  # cannot happen for an allocation free now; refuse rather than guess
        if self.projected.place(self.head, self.policy).fits:
            return True
        self.projected.release(job_id)
        return False

    def withdraw(self, job_id: str) -> None:
        """Undo `admits` for a job that will not start after all (another head refused it):
        it no longer holds anything in the projected cluster."""
        if self.projected is not None:
            with contextlib.suppress(UnknownJob):  # it ended by the shadow time: never held
                self.projected.release(job_id)


def reserve_head(cluster: Cluster, head: Request, holders: Iterable[Holding], now: float,
                 policy: str = "pack") -> Reservation:
    """The head's reservation: release holders in order of their end times (all those ending
    at one time together) until the head fits on the projected cluster.

    `cluster` is not changed. Holders not in `cluster` are ignored. The shadow time is never
    before `now` (a job past its estimate is taken to end now). If the head fits only once the
    holders without an end time are gone too, the shadow time is None; if it does not fit even
    then, the reservation has no projected cluster.
    """
    projected = cluster.copy()
    held = projected.allocations()
    # (end, job): one entry per held job with an end time (a job listed twice counts once).
    known = sorted({h.job_id: (h.ends_at, h.job_id) for h in holders
                    if h.job_id in held and h.ends_at is not None}.values())
    free = sum(projected.free(name).cpus_free for name in projected.hosts)
    i = 0
    while i < len(known):
        at = known[i][0]
        while i < len(known) and known[i][0] == at:
            alloc = projected.release(known[i][1])
            free += len(alloc.cpus) + len(alloc.idle_cpus)
            i += 1
        # Counting cpus first is a cheap bound: a fit needs at least as many free cpus.
        if free >= head.cpus and projected.place(head, policy).fits:
            return Reservation(head, max(now, at), projected, policy)
    for job_id in projected.allocations():
        projected.release(job_id)
    if projected.place(head, policy).fits:
        return Reservation(head, None, projected, policy)
    return Reservation(head, None, None, policy)
