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
from dataclasses import dataclass, replace

import placement
from placement import Request
from vmjobs.codec import allocation_from_dict, request_from_dict
from vmjobs.daemon import lending, moves
from vmjobs.daemon.core import Active, Daemon, LastPass, limit_of
from vmjobs.daemon.queue import Holding, Plan, Planner, Start, Wait, group_gangs, order
from vmjobs.gang import gang_of
from vmjobs.jobarray import array_of
from vmjobs.jobs import ACTIVE, MOVING, JobRecord, JobState, Kind
from vmjobs.snapshot import describe_allocation

log = logging.getLogger("vmjobs.daemon")
Queue = list[tuple[JobRecord, Request]]
HELD = frozenset({JobState.HELD})


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
        borrowed = set(lending.lend(daemon, queue))  # --borrow jobs on lent cores
        queue = [(r, q) for r, q in queue if r.id not in borrowed]
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
    for record in held_reservations(daemon):
        current.job_id = record.id
        until = record.spec.get("until")
        if until is not None and until <= now and record.id not in daemon.releasing:
            limit = limit_of(record.spec.get("time_limit"))
            why = f"its --duration of {limit:g}s is over" if limit else "its --duration is over"
            daemon.spawn(daemon.end_reservation, record.id, JobState.TIMEOUT, why,
                         name=f"expire-{record.id}")
    return gone


def held_reservations(daemon: Daemon) -> list[JobRecord]:
    """The HELD reservations this core times: a serving daemon's (a direct run's core acts on
    its own job only)."""
    return daemon.store.in_states(HELD) if daemon.scope is None else []


def make_room(daemon: Daemon, queue: Queue) -> None:
    """With `preemption: on`, move preemptible jobs for the first head in line; with nobody
    waiting (but `--borrow` jobs), bring back jobs that were checkpointed for others."""
    if daemon.config.preemption:
        # the first head in queue order (each pool's line has its own; one preemption at a
        # time, `Daemon.preempting`). Preemption makes room for one job: a gang at the head
        # needs room for all its members at once, which it does not plan yet, so a gang
        # waits for room instead.
        for record, request in queue:
            wait = daemon.waits.get(record.id)
            if wait is not None and wait.position == 1 and not wait.held:
                if gang_of(record.spec) is None:
                    moves.preempt_for(daemon, record.id, request)
                break
    # borrowers waiting for a loan do not hold back a restore: they are never first in line
    if all(r.spec.get("borrow") for r, _q in queue):
        moves.restore_waiting(daemon)


def next_deadline(daemon: Daemon, queue: Queue) -> float | None:
    """The earliest finite deadline (s since the epoch); a NaN would poison min()."""
    times = [float(r.spec["wait_deadline"]) for r, _ in queue
             if r.spec.get("wait_deadline") is not None]
    times += [a.ends_at for a in daemon.active.values()
              if a.ends_at is not None and a.stop is None]
    times += [float(r.spec["until"]) for r in held_reservations(daemon)
              if r.spec.get("until") is not None and r.id not in daemon.releasing]
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
    for record in daemon.store.in_states(HELD):  # held reservations end at their --duration
        until = record.spec.get("until")
        held.append(Holding(record.id, float(until) if until is not None else None))
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
    everything = daemon.queued() if queue is None else queue
    queued = [(r, q) for r, q in everything if r.inside is None]
    inner = [(r, q) for r, q in everything if r.inside is not None]
    if not queued:
        daemon.publish_waits({})
        daemon.last_pass = None
        if not inner:
            return Plan((), ())
        limits = {r.id: daemon.queue.waiting(r, q).time_limit_s for r, q in inner}
        return _launch(daemon, schedule_inside(daemon, now, inner, current), limits, current)
    # in queue order already: the sort is one linear pass
    jobs = order([daemon.queue.waiting(r, q) for r, q in queued])
    waiting = group_gangs(jobs)  # a gang's queued members: one entry
    gangs = {w.job_id: [m for m, _ in w.members] for w in waiting if w.members}
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
        kinds = {r.id: r for r, _ in queued}
        for start in result.starts:
            current.job_id = start.job_id
            how = "backfilled: it ends before the first in line is due or leaves it room" \
                if start.backfilled else "placed in queue order"
            # the placement stays in the timeline after the reservation is released
            what = f"{how}: {describe_allocation(start.allocation)}"
            record = kinds[start.job_id]
            if record.kind == Kind.RESERVATION:
                limit = limit_of(record.spec.get("time_limit"))
                daemon.store.hold(start.job_id, start.allocation, f"held, {what}",
                                  now + limit if limit is not None else None)
            else:
                daemon.store.assign(start.job_id, start.allocation, what)
        daemon.live.refresh()  # this pass's own reservations: O(starts)
        daemon.live.prune()
        started = {s.job_id for s in result.starts}
        started |= {g for g, ids in gangs.items() if set(ids) <= started}
        since = last.at if carried and last is not None else now
        daemon.last_pass = LastPass(planner, daemon.live.version, since,
                                    tuple(i for i in ids if i not in started))
    daemon.publish_waits(result.member_waits(gangs), merge=carried)
    limits = {w.job_id: w.time_limit_s for w in jobs}
    for gang_id in gangs:
        if gang_id in started:  # every member reserved: the hooks run before any launch
            daemon.gang_starting(gang_id)
    guests = tuple(s for s in result.starts if kinds[s.job_id].kind == Kind.JOB)
    inside = schedule_inside(daemon, now, inner, current) if inner else Plan((), ())
    limits.update({r.id: daemon.queue.waiting(r, q).time_limit_s for r, q in inner})
    _launch(daemon, Plan(guests + inside.starts, ()), limits, current)
    if result.starts:
        daemon.wake()
    return Plan(result.starts + inside.starts, result.waits + inside.waits, result.shadow)


def _launch(daemon: Daemon, plan: Plan, limits: dict[str, float | None],
            current: Pass) -> Plan:
    """Admit and launch the guests of `plan`'s starts (jobs, not reservations)."""
    for start in plan.starts:
        current.job_id = start.job_id
        daemon.admit(Active(start.job_id, start.allocation.host, limits.get(start.job_id)))
        daemon.spawn(daemon.launch, start.job_id, name=f"launch-{start.job_id}",
                     job_id=start.job_id)
    if plan.starts:
        daemon.wake()
    return plan


def inside_cluster(daemon: Daemon, reservation: JobRecord) -> placement.Cluster:
    """A held reservation's share of its host as a cluster of its own (`placement.restrict`),
    with what the jobs inside it hold now. Caller holds the lock."""
    assert reservation.allocation is not None
    allocation = allocation_from_dict(reservation.allocation)
    host = daemon.live.cluster().hosts[allocation.host]
    cluster = placement.Cluster([placement.restrict(host, allocation)])
    for record in daemon.store.inside(reservation.id):
        if record.allocation is not None:
            request = request_from_dict(record.request) if record.request else None
            cluster.reserve(record.id, allocation_from_dict(record.allocation), request)
    return cluster


def schedule_inside(daemon: Daemon, now: float, inner: Queue, current: Pass) -> Plan:
    """Place the jobs queued inside held reservations, each reservation's queue on its own
    share (`inside_cluster`) with the same policy as the whole queue (`queue.Planner`: FIFO
    within priority, backfill by time limits). A job whose reservation has ended is
    cancelled. Records the placements (the rows stay the reservation's, marked as used by the
    job) and the waits; returns the starts to launch. Caller holds the lock."""
    by_reservation: dict[str, Queue] = {}
    for record, request in inner:
        assert record.inside is not None
        by_reservation.setdefault(record.inside, []).append((record, request))
    starts: list[Start] = []
    waits: dict[str, Wait] = {}
    for reservation_id, jobs in by_reservation.items():
        reservation = daemon.store.job(reservation_id)
        if reservation is None or reservation.state.finished:
            for record, _ in jobs:
                current.job_id = record.id
                daemon.stop(record.id, JobState.CANCELLED,
                            f"reservation {reservation_id} has ended")
            continue
        if reservation.state != JobState.HELD or reservation_id in daemon.releasing:
            continue
        cluster = inside_cluster(daemon, reservation)
        holders = [Holding(r.id, None) for r in daemon.store.inside(reservation_id, ACTIVE)]
        waiting = order([daemon.queue.waiting(r, q) for r, q in jobs])
        result = Planner(cluster, holders).offer(waiting, now)
        with daemon.store.reserving():
            for start in result.starts:
                current.job_id = start.job_id
                daemon.store.assign(start.job_id, start.allocation,
                                    f"placed inside reservation {reservation_id}: "
                                    f"{describe_allocation(start.allocation)}")
        starts.extend(result.starts)
        # `held`: nothing outside the reservation can make room for them (no preemption);
        # their positions are in the reservation's own line
        waits.update({w.job_id: replace(w, reason=f"inside reservation {reservation_id}: "
                                                  f"{w.reason}", held=True)
                      for w in result.waits})
    daemon.publish_waits(waits, merge=True)
    return Plan(tuple(starts), tuple(waits.values()))


def start_now_or_forget(daemon: Daemon, job_id: str, *others: str) -> str | None:
    """Run a scheduling pass for a job that must start now or never (`--no-wait`, a direct
    `vmjob run`): None if it started; otherwise the job is forgotten (no row, no directory:
    it never existed) and the reason it could not start is returned. `others`: the other
    members of a gang, which start with it or are forgotten with it (a gang is placed all or
    none, so one pass starts all of them or none). Caller holds the lock."""
    job_ids = (job_id, *others)
    result = schedule(daemon, time.time())
    started = {s.job_id for s in result.starts}
    if all(j in started for j in job_ids):
        return None
    why = next((w.reason for w in result.waits if w.job_id in job_ids), "it cannot start")
    for forgotten in job_ids:
        daemon.forget_wait(forgotten)
        daemon.store.delete_job(forgotten)
        daemon.forget_files(forgotten)
    return why
