"""The scheduler: wakes on a change (submit, job end, cancel, host up/down) or on the next
deadline (a time limit, a --wait-timeout), never on a polling interval.

Each pass, under the daemon's lock: expire what is due, then plan the queue (`queue.plan`) on
a snapshot of hardware (libvirt inventory) and holdings (the store), and reserve what starts
inside the store's write lock — the same transaction discipline as `vmjob run` — before
launching the guests on their own threads.
"""

from __future__ import annotations

import logging
import time

from placement import Request
from vmjobs.daemon import moves
from vmjobs.daemon.core import Active, Daemon, Phase, time_limit_of
from vmjobs.daemon.queue import Holding, Plan, Waiting, plan
from vmjobs.jobs import ACTIVE, JobRecord, JobState
from vmjobs.runner import describe_allocation, snapshot

log = logging.getLogger("vmjobs.daemon")
Queue = list[tuple[JobRecord, Request]]


def run(daemon: Daemon) -> None:
    """Thread: the scheduler loop."""
    with daemon.lock:
        while not daemon.stopping:
            daemon.dirty = False
            now = time.time()
            queue: Queue = []
            try:
                # the queue is read once per pass: parsing it is most of a pass's cost
                queue = daemon.store.queued()
                gone = expire(daemon, now, queue)
                queue = [(r, q) for r, q in queue if r.id not in gone]
                started = {s.job_id for s in schedule(daemon, now, queue).starts}
                queue = [(r, q) for r, q in queue if r.id not in started]
                make_room(daemon, queue)
            except Exception:  # a bug or a store error: keep serving, try again on next change
                log.exception("scheduling pass failed")
            due = next_deadline(daemon, queue)
            timeout = None if due is None else max(due - time.time(), 0.0)
            daemon.changed.wait_for(lambda: daemon.dirty or daemon.stopping, timeout)


def expire(daemon: Daemon, now: float, queue: Queue) -> set[str]:
    """Queued jobs past their --wait-timeout give up (their ids are returned); running jobs
    past their limit stop."""
    gone = set()
    for record, _request in queue:
        deadline = record.spec.get("wait_deadline")
        if deadline is not None and deadline <= now:
            waited = now - record.created
            daemon.stop(record.id, JobState.EXPIRED,
                        f"gave up after waiting {waited:.0f}s (--wait-timeout); it never started")
            gone.add(record.id)
    for active in list(daemon.active.values()):
        if active.ends_at is not None and active.ends_at <= now and active.stop is None:
            reason = f"time limit of {active.time_limit_s:g}s reached; guest stopped"
            active.stop = (JobState.TIMEOUT, reason)
            if active.phase == Phase.MOVING:
                continue  # never destroyed mid-move: the mover aborts the move, settle() stops it
            # destroying takes seconds: not under the lock
            daemon.spawn(daemon.destroy_guest, active.host, active.job_id,
                         name=f"timeout-{active.job_id}")
    return gone


def make_room(daemon: Daemon, queue: Queue) -> None:
    """With `preemption: on`, move preemptible jobs for the first in line; with nobody
    waiting, bring back jobs that were checkpointed for others."""
    head = next((w for w in daemon.waits.values() if w.position == 1), None)
    if head is not None and daemon.config.preemption:
        request = next((q for r, q in queue if r.id == head.job_id), None)
        if request is not None:
            moves.preempt_for(daemon, head.job_id, request)
    if not queue:
        moves.restore_waiting(daemon)


def next_deadline(daemon: Daemon, queue: Queue) -> float | None:
    times = [r.spec["wait_deadline"] for r, _ in queue
             if r.spec.get("wait_deadline") is not None]
    times += [a.ends_at for a in daemon.active.values()
              if a.ends_at is not None and a.stop is None]
    return min(times, default=None)


def holdings(daemon: Daemon, now: float) -> list[Holding]:
    """Who holds resources and when each must end at the latest, from the time limits."""
    started = daemon.store.started_at()
    held = []
    for record in daemon.store.in_states(ACTIVE):
        limit = time_limit_of(record)
        active = daemon.active.get(record.id)
        if active is not None and active.ends_at is not None:
            ends = active.ends_at
        elif limit is None:
            ends = None
        else:
            ends = started.get(record.id, now) + limit
        held.append(Holding(record.id, ends))
    return held


def schedule(daemon: Daemon, now: float, queue: Queue | None = None) -> Plan:
    """One pass: reserve and launch what may start; remember why the others wait."""
    queued = daemon.store.queued() if queue is None else queue
    if not queued:
        daemon.waits = {}
        return Plan((), ())
    waiting = [Waiting(r.id, request, time_limit_of(r)) for r, request in queued]
    with daemon.store.reserving():
        cluster = snapshot(daemon.store, daemon.hosts.inventory())
        result = plan(cluster, waiting, holdings(daemon, now), now)
        for start in result.starts:
            how = "backfilled: it ends before the first in line is due or leaves it room" \
                if start.backfilled else "placed in queue order"
            # the placement stays in the timeline after the reservation is released
            daemon.store.assign(start.job_id, start.allocation,
                                f"{how}: {describe_allocation(start.allocation)}")
    daemon.waits = {w.job_id: w for w in result.waits}
    limits = {w.job_id: w.time_limit_s for w in waiting}
    for start in result.starts:
        daemon.active[start.job_id] = Active(start.job_id, start.allocation.host,
                                             limits[start.job_id])
        daemon.spawn(daemon.launch, start.job_id, name=f"launch-{start.job_id}")
    if result.starts:
        daemon.wake()
    return result
