"""The scheduler: wakes on a change (submit, job end, cancel, host up/down) or on the next
deadline (a time limit, a --wait-timeout), never on a polling interval.

Each pass, under the daemon's lock: expire what is due, then plan the queue (`queue.Planner`)
on the live cluster model (`daemon.live`: hardware and holdings, kept current by change), and
reserve what starts
inside the store's write lock — the same transaction discipline as `vmjob run` — before
launching the guests on their own threads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from placement import Request
from vmjobs.daemon import moves
from vmjobs.daemon.core import Active, Daemon, LastPass, limit_of
from vmjobs.daemon.queue import Holding, Plan, Planner, order
from vmjobs.jobarray import array_of
from vmjobs.jobs import ACTIVE, MOVING, JobRecord, JobState
from vmjobs.snapshot import describe_allocation

log = logging.getLogger("vmjobs.daemon")
Queue = list[tuple[JobRecord, Request]]


# The longest the loop sleeps without a change: a deadline further away (or one that is not a
# number) is looked at again then. Condition.wait refuses NaN and timeouts past time_t.
MAX_SLEEP_S = 3600.0
RETRY_AFTER_FAILURE_S = 5.0
# A pass carried on with new jobs (see `schedule`) is replaced by a full one this often. Any
# change of holdings or hosts makes a full pass anyway; what only a full pass picks up is a
# holder's end estimate moving from "now + limit" (placed) to "start + limit" (running),
# which differ by its start-up time. A full pass with a job waiting costs O(holders): ~3 s
# at 5,000 hosts and 50,000 jobs here.
FULL_PASS_EVERY_S = 300.0


@dataclass
class Pass:
    """What a scheduling pass is doing, so that a failure names the job it concerns."""

    job_id: str | None = None


def run(daemon: Daemon) -> None:
    """Thread: the scheduler loop. It never ends on an error: a pass that fails is logged with
    the job it concerns (which ends FAILED with the error, so that it cannot block the queue
    pass after pass) and the next change or deadline brings another pass. `/v1/status` shows
    whether it runs (`Daemon.scheduler`)."""
    with daemon.lock:
        daemon.scheduler.running = True
    try:
        with daemon.lock:
            while not daemon.stopping:
                daemon.mark_seen()
                timeout = one_pass(daemon)
                daemon.changed.wait_for(lambda: daemon.dirty or daemon.stopping, timeout)
    finally:
        with daemon.lock:
            daemon.scheduler.running = False
            if not daemon.stopping:
                log.critical("the scheduler stopped: no job will start until the daemon "
                             "is restarted")


def one_pass(daemon: Daemon) -> float | None:
    """Expire, plan and launch; how long to sleep before the next pass unless woken.
    Caller holds the lock. Raises nothing (a failure is handled by `pass_failed`)."""
    now = time.time()
    began = time.perf_counter()
    queue: Queue = []
    current = Pass()
    try:
        daemon.retry_unrecorded()
        # the queue is followed by change (`LiveQueue`), not read whole each pass; only the
        # jobs this core owns (a direct run's core: its one job)
        queue = daemon.queued()
        gone = expire(daemon, now, queue, current)
        queue = [(r, q) for r, q in queue if r.id not in gone]
        started = {s.job_id for s in schedule(daemon, now, queue, current).starts}
        queue = [(r, q) for r, q in queue if r.id not in started]
        current.job_id = None
        make_room(daemon, queue)
        daemon.scheduler.record(time.perf_counter() - began, len(started))
        return sleep_for(next_deadline(daemon, queue), time.time())
    except Exception as exc:
        pass_failed(daemon, current.job_id, exc)
        # ending the job woke the loop already; if even that failed (a store error), try
        # again after a while rather than at once, pass after pass
        return RETRY_AFTER_FAILURE_S


def sleep_for(due: float | None, now: float) -> float | None:
    """Seconds until `due`, within [0, MAX_SLEEP_S]; None (until woken) without a deadline."""
    if due is None:
        return None
    if not math.isfinite(due):
        return MAX_SLEEP_S
    return min(max(due - now, 0.0), MAX_SLEEP_S)


def pass_failed(daemon: Daemon, job_id: str | None, exc: Exception) -> None:
    """A pass failed on a bug or a store error: log it with its job, end that job FAILED with
    the error as its message (it would fail every pass again). Caller holds the lock."""
    where = f" on job {job_id}" if job_id else ""
    log.exception("scheduling pass failed%s", where)
    daemon.scheduler.failed_passes += 1
    daemon.scheduler.last_failure = f"{job_id or 'queue'}: {type(exc).__name__}: {exc}"
    if job_id is None:
        return
    reason = f"vmjob failed while scheduling it: {type(exc).__name__}: {exc}"
    try:
        record = daemon.store.job(job_id)
        if record is None or record.state.finished:
            return
        if job_id in daemon.active:
            daemon.spawn(daemon.fail_stranded, job_id, reason, name=f"fail-{job_id}")
        elif record.state == JobState.QUEUED:
            daemon.stop(job_id, JobState.FAILED, reason)
        else:  # placed in the store but never handed to a launcher
            daemon.record(job_id, JobState.FAILED, reason, release=True)
            daemon.wake()
    except Exception:
        log.exception("job %s: could not record the scheduling failure", job_id)


def expire(daemon: Daemon, now: float, queue: Queue, current: Pass | None = None) -> set[str]:
    """Queued jobs past their --wait-timeout give up (their ids are returned); running jobs
    past their limit stop."""
    current = current or Pass()
    gone = set()
    for record, _request in queue:
        current.job_id = record.id
        deadline = record.spec.get("wait_deadline")
        if deadline is not None and deadline <= now:
            waited = now - record.created
            daemon.stop(record.id, JobState.EXPIRED,
                        f"gave up after waiting {waited:.0f}s (--wait-timeout); it never started")
            gone.add(record.id)
    for active in list(daemon.active.values()):
        current.job_id = active.job_id
        if active.ends_at is not None and active.ends_at <= now:
            daemon.time_limit_reached(active)
    return gone


def make_room(daemon: Daemon, queue: Queue) -> None:
    """With `preemption: on`, move preemptible jobs for the first head in line; with nobody
    waiting, bring back jobs that were checkpointed for others."""
    if daemon.config.preemption:
        # the first head in queue order (each pool's line has its own; one preemption at a
        # time, `Daemon.preempting`)
        for record, request in queue:
            wait = daemon.waits.get(record.id)
            if wait is not None and wait.position == 1 and not wait.held:
                moves.preempt_for(daemon, record.id, request)
                break
    if not queue:
        moves.restore_waiting(daemon)


def next_deadline(daemon: Daemon, queue: Queue) -> float | None:
    """The earliest finite deadline (s since the epoch); a NaN would poison min()."""
    times = [float(r.spec["wait_deadline"]) for r, _ in queue
             if r.spec.get("wait_deadline") is not None]
    times += [a.ends_at for a in daemon.active.values()
              if a.ends_at is not None and a.stop is None]
    if daemon.unrecorded:  # ends the store could not take: try again shortly
        times.append(time.time() + RETRY_AFTER_FAILURE_S)
    return min((t for t in times if math.isfinite(t)), default=None)


def holdings(daemon: Daemon, now: float) -> list[Holding]:
    """Who holds resources and when each must end at the latest, from the time limits.
    O(active jobs): read only when a job waits (`queue.plan` asks for it then)."""
    limits = daemon.store.time_limits(ACTIVE)
    started = daemon.store.started_at([job_id for job_id, _ in limits])
    held = []
    for job_id, value in limits:
        limit = limit_of(value)
        active = daemon.active.get(job_id)
        if active is not None and active.ends_at is not None:
            ends = active.ends_at
        elif limit is None:
            ends = None
        else:
            ends = started.get(job_id, now) + limit
        held.append(Holding(job_id, ends))
    return held


def running_arrays(daemon: Daemon) -> dict[str, int]:
    """Array id -> how many of its jobs hold resources or are being moved (for `%N`)."""
    counts: dict[str, int] = {}
    for record in daemon.store.in_states(ACTIVE | MOVING):
        if (array := array_of(record.spec)) is not None:
            counts[array[0]] = counts.get(array[0], 0) + 1
    return counts


def schedule(daemon: Daemon, now: float, queue: Queue | None = None,
             current: Pass | None = None) -> Plan:
    """One pass: reserve and launch what may start; remember why the others wait.

    The pass plans on the live cluster model (`daemon.live`), refreshed inside the store's
    write lock from what changed since the last pass. When nothing changed but jobs added at
    the queue's end, the last pass is carried on with those alone (`LastPass`), so a submit
    to a full cluster costs O(the new job), not O(queue + holders); a full pass is made at
    least every FULL_PASS_EVERY_S, so that running jobs' end times (backfill) stay current."""
    current = current or Pass()
    queued = daemon.queued() if queue is None else queue
    if not queued:
        daemon.publish_waits({})
        daemon.last_pass = None
        return Plan((), ())
    # in queue order already: the sort is one linear pass
    waiting = order([daemon.queue.waiting(r, q) for r, q in queued])
    with daemon.store.reserving():
        daemon.live.refresh()
        last = daemon.last_pass
        ids = tuple(w.job_id for w in waiting)
        carried = (last is not None and last.version == daemon.live.version
                   and now - last.at < FULL_PASS_EVERY_S
                   and ids[:len(last.queue)] == last.queue)
        if carried:
            assert last is not None
            planner = last.planner
            result = planner.offer(waiting[len(last.queue):], now)
        else:
            # the arrays' running counts change only with holdings, which end a carried pass
            running = running_arrays(daemon) if any(w.array for w in waiting) else None
            planner = Planner(daemon.live.cluster(), lambda: holdings(daemon, now),
                              running=running)
            result = planner.offer(waiting, now)
        for start in result.starts:
            current.job_id = start.job_id
            how = "backfilled: it ends before the first in line is due or leaves it room" \
                if start.backfilled else "placed in queue order"
            # the placement stays in the timeline after the reservation is released
            daemon.store.assign(start.job_id, start.allocation,
                                f"{how}: {describe_allocation(start.allocation)}")
        daemon.live.refresh()  # this pass's own reservations: O(starts)
        daemon.live.prune()
        started = {s.job_id for s in result.starts}
        since = last.at if carried and last is not None else now
        daemon.last_pass = LastPass(planner, daemon.live.version, since,
                                    tuple(i for i in ids if i not in started))
    daemon.publish_waits({w.job_id: w for w in result.waits}, merge=carried)
    limits = {w.job_id: w.time_limit_s for w in waiting}
    for start in result.starts:
        current.job_id = start.job_id
        daemon.admit(Active(start.job_id, start.allocation.host, limits[start.job_id]))
        daemon.spawn(daemon.launch, start.job_id, name=f"launch-{start.job_id}",
                     job_id=start.job_id)
    if result.starts:
        daemon.wake()
    return result


def start_now_or_forget(daemon: Daemon, job_id: str) -> str | None:
    """Run a scheduling pass for a job that must start now or never (`--no-wait`, a direct
    `vmjob run`): None if it started; otherwise the job is forgotten (no row, no directory:
    it never existed) and the reason it could not start is returned. Caller holds the lock."""
    result = schedule(daemon, time.time())
    if any(s.job_id == job_id for s in result.starts):
        return None
    why = next((w.reason for w in result.waits if w.job_id == job_id), "it cannot start")
    daemon.forget_wait(job_id)
    daemon.store.delete_job(job_id)
    daemon.forget_files(job_id)
    return why
