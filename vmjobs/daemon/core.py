"""The daemon's state and every change of a job's life under it.

One lock guards the store connection and the in-memory state (`active`: the jobs that hold a
guest or are about to). Slow work — writing a guest's files, starting it, destroying it,
reading its output — happens outside the lock, in a thread per job; each re-checks under the
lock that the job is still its to act on. Every change calls `wake()`: the scheduler, `wait`
requests and `logs -f` streams all sleep on the one condition variable it notifies.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from placement import Allocation, Request
from vmjobs import gang, template
from vmjobs.cbuild import build_static
from vmjobs.checkpoint import discard, discard_periodic
from vmjobs.codec import allocation_from_dict
from vmjobs.config import Config
from vmjobs.controlhub import ControlHub
from vmjobs.controljournal import ControlJournal
from vmjobs.daemon import gangwire, resizewire
from vmjobs.daemon.hosts import (
    GuestPoweredOff,
    GuestStopped,
    HostDown,
    HostLost,
    Hosts,
    HostUp,
    Note,
)
from vmjobs.daemon.live import LiveCluster, LiveQueue
from vmjobs.daemon.metrics import Metrics
from vmjobs.daemon.queue import Planner, Wait
from vmjobs.daemon.sampler import Sampler, read_memory_kib, read_vcpu_ns
from vmjobs.daemon.stdin import InputFeed
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.guest import (
    OUTPUT_CHECK_S,
    GuestPlan,
    JobFiles,
    OutputGuard,
    Verdict,
    collect,
)
from vmjobs.guestresize import GuestResizes
from vmjobs.image import resolve_image
from vmjobs.jobarray import array_env
from vmjobs.jobs import UNFINISHED, HostLossPolicy, JobRecord, JobState, domain_name
from vmjobs.outputwatch import OutputWatch
from vmjobs.store import Store
from vmjobs.virt import Domain, VirtError, probe
from vmjobs.virt.conn import destroy_quietly, is_alive, lookup_domain
from vmjobs.virt.console import InputPort
from vmjobs.virt.domain_xml import Hotplug

log = logging.getLogger("vmjobs.daemon")
RECENT_PASSES = 2000  # scheduling passes whose duration /v1/status reports
# how long releasing a reservation waits for the guests inside it to be gone (a destroy
# takes ~2 s here; QEMU's reaping up to 2 s more)
RELEASE_SETTLE_S = 120.0


class Phase(StrEnum):
    """Where the daemon is with an active job's guest (finer than the job's state: a RUNNING
    job's guest may be running, or stopped and being collected)."""

    LAUNCHING = "launching"  # its files are written and its guest started (PLACED, STARTING)
    RUNNING = "running"  # its guest runs; STOPPED / power-off events are acted on
    MOVING = "moving"  # a migration, checkpoint or restore drives it; events are ignored
    COLLECTING = "collecting"  # its guest stopped; its verdict and output are being read
    ENDED = "ended"  # its end is recorded; its cores are freed when QEMU is gone


@dataclass
class Active:
    """A job that holds a reservation: being launched, running, or being collected."""

    job_id: str
    host: str
    time_limit_s: float | None
    phase: Phase = Phase.LAUNCHING
    ends_at: float | None = None  # when its time limit stops it
    stop: tuple[JobState, str] | None = None  # set by cancel / time limit: how it will end
    powered_off_at: float | None = None  # when the guest's own power-off was reported
    stopped_at: float | None = None  # when its guest's STOPPED event arrived
    # a periodic checkpoint is under way (phase MOVING): it leaves the guest where it is and
    # writes nothing but the job's checkpoint mark, so a lost host settles the job at once
    # rather than waiting for it — a libvirt call on a vanished host can hang for good
    periodic: bool = False


def time_limit_of(record: JobRecord) -> float | None:
    """The job's time limit in seconds; None without one. A value that is not a positive
    finite number (a record written before submissions were checked) counts as none rather
    than as a deadline no clock reaches (NaN) or one in the past."""
    # records written before the spec have timeout_s
    return limit_of(record.spec.get("time_limit", record.spec.get("timeout_s")))


def limit_of(value: object) -> float | None:
    """`time_limit_of` for the value the spec holds."""
    try:
        limit = float(value) if value else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return limit if limit is not None and math.isfinite(limit) and limit > 0 else None


@dataclass(frozen=True)
class Unrecorded:
    """A job's end the store could not take (a full spool), to be recorded later."""

    verdict: Verdict
    release: bool
    error: str


@dataclass(frozen=True)
class StopAsked:
    """A stop asked where it cannot be carried out (a signal handler, which must not take
    the lock): the notes thread carries it out with `Daemon.stop`."""

    job_id: str
    state: JobState
    reason: str


@dataclass
class LastPass:
    """The scheduler's last pass: what it decided on which cluster. While the cluster has not
    changed since (`LiveCluster.version`) and the queue is the same with jobs
    added at its end, the next pass only decides those (`queue.Planner.offer`)."""

    planner: Planner
    version: tuple[int, int]  # the live model's, after this pass's own reservations
    at: float  # when the full pass it carries on was made
    queue: tuple[str, ...]  # the jobs left waiting, in queue order


@dataclass
class SchedulerState:
    """What `/v1/status` says about the scheduler thread."""

    running: bool = False
    failed_passes: int = 0
    last_failure: str | None = None
    passes: int = 0
    # the last passes: (seconds, jobs started), for bench/scale.py and /v1/status
    recent: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_PASSES))

    def record(self, seconds: float, starts: int) -> None:
        self.passes += 1
        self.recent.append((seconds, starts))


def console_helper(spool: Path) -> Path:
    """images/vmjob-console.c built (once per source) for interactive jobs' guests. Raises
    VmjobsError when it cannot be built (no C compiler or static libc)."""
    return build_static("vmjob-console.c", spool / "bin", "an interactive job", "-Os")


def is_ours(record: JobRecord) -> bool:
    """Jobs the daemon runs; `vmjob run` without a daemon records its own process instead."""
    return "runner" not in record.spec


def _no_guest_resize(job_id: str, _cpus: int | None, _memory_mib: int | None) -> str:
    raise VmjobsError(f"job {job_id}: this daemon does not resize jobs from their guests")


class Daemon:
    """The job lifecycle: one per `vmjob serve`, or one per direct `vmjob run` scoped to its
    own job (`scope`; see `vmjobs.daemon.direct`). Its state (`active`, `waits`,
    `restoring`, `preempting`, `dirty`) and the store's job states change only through its
    methods (`tests/unit/test_daemon_state.py` checks that no other module assigns them)."""

    def __init__(self, config: Config, scope: str | None = None,
                 tell: Callable[[str], None] | None = None) -> None:
        self.config = config
        # Notes about starting a job (the KVM probe, a warm start's template): the daemon's log,
        # or a direct run's user on stderr, as the command that waits for them.
        self.tell = tell or (lambda text: log.info("%s", text))
        # A direct run's core acts on its one job only: no other job is scheduled, timed,
        # collected or recovered by it (the spool's daemon, if one starts, keeps the rest).
        self.scope = scope
        self.store = Store(config.state_db, shared=True)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        # `logs -f` streams: woken with every waiter on the condition (daemon/logs.py)
        self.followers: set[OutputWatch] = set()
        self.notes: queue.SimpleQueue[Note | StopAsked | None] = queue.SimpleQueue()
        self.hosts = Hosts(config, self.notes)  # type: ignore[arg-type]
        # the engine's view, kept current by change (never rebuilt per pass)
        self.live = LiveCluster(self.store, self.hosts.inventory,
                                lambda: self.hosts.generation)
        self.queue = LiveQueue(self.store, time_limit_of)
        # the scheduler's last pass, carried on while only the queue's end changes
        self.last_pass: LastPass | None = None
        self.active: dict[str, Active] = {}
        self.waits: dict[str, Wait] = {}  # the last scheduling pass's verdict per queued job
        self.dirty = True
        self.stopping = False
        self.metrics = Metrics()
        # guests' real CPU use; its thread is started by `daemon.main` when sampling is on
        borrow = config.borrow
        self.sampler = Sampler(
            config.usage_sample_interval_s, config.usage_window_s,
            lambda host, job_id: read_vcpu_ns(self.hosts.conn(host), job_id),
            idle_below=borrow.idle_below if borrow is not None else None,
            fast_interval_s=borrow.fast_interval_s(config.usage_sample_interval_s)
            if borrow is not None and config.usage_sample_interval_s > 0 else None,
            # guests' memory (their balloons), over `borrow.for` too when memory is lent
            read_memory=lambda host, job_id: read_memory_kib(self.hosts.conn(host), job_id),
            memory_window_s=max(config.usage_window_s, borrow.for_s)
            if borrow is not None and borrow.balloon else None)
        self.leaving: set[str] = set()  # borrowers being moved off lent cores (daemon/lending)
        self.restoring: set[str] = set()  # checkpointed jobs being restored now
        self.preempting: str | None = None  # the job that preemption is making room for
        self.releasing: set[str] = set()  # held reservations being released now
        self.scheduler = SchedulerState()
        self.unrecorded: dict[str, Unrecorded] = {}  # ends waiting for room in the store
        # What becomes of a job whose host is lost (`record`, why), caller holding the lock:
        # LOST here (a direct run's core); the job's --on-host-loss policy under a serving
        # daemon (`vmjobs.daemon.hostloss.settle_lost`, wired in by `daemon.main`).
        self.on_job_lost: Callable[[JobRecord, str], None] = \
            lambda record, why: self.finish(record.id, Verdict(JobState.LOST, why))
        # interactive jobs' input on its way to their guests (daemon/stdin.py), by job
        self.inputs: dict[str, InputFeed] = {}
        # What to do when a host (re)connects: recovery's `reconcile_host`, wired in by
        # `daemon.main` (recovery builds on this module; importing it here made a cycle).
        self.on_host_up: Callable[[str], object] = lambda _host: None
        # gangs' coordination state (vmjob-ctl, `vmjob kv`), keyed by gang id; kept in the
        # store by a serving daemon, so that its restart loses none of it
        self.control = ControlHub(journal=ControlJournal(config.state_db)
                                  if scope is None else None)
        # resizable jobs' own requests to be resized (`vmjob-ctl resize`, resize_from_guest)
        # what such a request does: its owner's resize, wired in by `daemon.main` (it builds
        # on this module, like recovery)
        self.guest_resize: Callable[[str, int | None, int | None], str] = _no_guest_resize
        self.guest_resizes = GuestResizes(
            lambda job_id, cpus, mem: self.guest_resize(job_id, cpus, mem),
            lambda carry_out: self.spawn(carry_out, name="guest-resize"), time.monotonic)
        # around a gang's start and end (its network, its control channel plug in here)
        self.gang_hooks = gang.GangHooks()
        self.gangs_ended: set[str] = set()  # gangs whose `ended` hooks ran (once each)
        # the last member's end closes the gang's control state and removes its network
        self.gang_hooks.ended.append(lambda g, _m: gangwire.gang_ended(self, g, self.spawn))

    def owns(self, record: JobRecord) -> bool:
        """Whether this core acts on `record`: a serving daemon on its own jobs (not those of
        direct runs), a direct run's core on its one job."""
        return record.id == self.scope if self.scope is not None else is_ours(record)

    def refuse_never_fitting(self, request: Request) -> None:
        """Raises DoesNotFit, with the engine's explanation, for a request no host could take
        even empty (asked before anything of the job exists)."""
        with self.lock:
            cluster = self.live.cluster()
            # ever_fits stops at the first host that could take it; explain looks at all
            if not cluster.ever_fits(request):
                raise DoesNotFit(cluster.explain(request).summary)

    # --- the daemon's state: changed only here ------------------------------------------------

    def mark_seen(self) -> None:
        """A scheduling pass begins: changes from now on call for another. Caller holds the
        lock."""
        self.dirty = False

    def admit(self, active: Active) -> None:
        """`active` holds (or is about to hold) a guest this core follows. Caller holds the
        lock."""
        self.active[active.job_id] = active

    def drop(self, job_id: str) -> None:
        """Stop following a job that holds nothing any more. Caller holds the lock."""
        self.active.pop(job_id, None)

    def record(self, job_id: str, state: JobState, reason: str, *, release: bool = False,
               exit_code: int | None = None) -> None:
        """A change of the job's state in the store (`release`: and free its reservation in
        the same transaction). Raises IllegalTransition on a change the state table does not
        allow. Caller holds the lock."""
        self.store.transition(job_id, state, reason, release=release, exit_code=exit_code)
        if state.finished:
            # a member's failure poisons its gang's barriers first (naming it), then the gang
            # stops the others and, at the last member's end, runs its `ended` hooks
            gangwire.member_ended(self, job_id, state, exit_code, self.spawn)
            self.member_ended(job_id, state, exit_code)

    # --- gangs ------------------------------------------------------------------------------

    def gang_starting(self, gang_id: str) -> None:
        """Every member of `gang_id` is reserved and about to be launched: run the gang's
        `starting` hooks. Caller holds the lock."""
        self._run_gang_hooks(self.gang_hooks.starting, gang_id)

    def member_ended(self, job_id: str, state: JobState, exit_code: int | None) -> None:
        """A job's end is recorded; if it is a gang's member: with `on_member_failure: stop`
        a failure (`gang.is_failure`) stops the other members (marked as stopped by it, so the
        gang ends with this member's code), and the gang's `ended` hooks run once the last
        member has ended. Caller holds the lock."""
        record = self.store.job(job_id)
        ref = gang.gang_of(record.spec) if record is not None else None
        if ref is None or record is None or not self.owns(record):
            return
        cause = gangwire.failed_first(self, record) \
            if record.spec.get(gang.KEY_STOPPED_BY) is None \
            and gang.is_failure(state, exit_code) else None
        if cause is not None:
            # it failed on the poison of a member whose job failed first (its init said so)
            # and whose end is on its way: that one decides the gang's failure and its stop
            self.store.mark(job_id, **{gang.KEY_STOPPED_BY: cause})
        elif record.spec.get(gang.KEY_STOPPED_BY) is None and ref.on_failure == "stop" \
                and gang.is_failure(state, exit_code):
            others = [r for r in gang.member_records(self.store, ref.gang_id)
                      if r.id != job_id and not r.state.finished]
            code = f" (exit {exit_code})" if exit_code is not None else ""
            reason = f"stopped: gang member {job_id} ended {state.value}{code}"
            for other in others:
                self.store.mark(other.id, **{gang.KEY_STOPPED_BY: job_id})
            later = self.stop_without_guest([o.id for o in others], JobState.CANCELLED,
                                            reason)
            for other_id in later:
                self.spawn(self.stop, other_id, JobState.CANCELLED, reason,
                           name=f"gang-stop-{other_id}")
        if ref.gang_id not in self.gangs_ended \
                and all(m.state.finished for m in gang.members(self.store, ref.gang_id)):
            self.gangs_ended.add(ref.gang_id)
            self._run_gang_hooks(self.gang_hooks.ended, ref.gang_id)

    def _run_gang_hooks(self, hooks: list[Callable[[str, list[gang.Member]], None]],
                        gang_id: str) -> None:
        members = gang.members(self.store, gang_id)
        for hook in hooks:
            try:
                hook(gang_id, members)
            except Exception:
                log.exception("gang %s: hook %s failed", gang_id, hook)

    def publish_waits(self, waits: dict[str, Wait], merge: bool = False) -> None:
        """The last scheduling pass's verdict for each queued job (`merge`: for the jobs it
        looked at; a pass carried on from the last one). Caller holds the lock."""
        if merge:
            self.waits.update(waits)
        else:
            self.waits = waits

    def forget_wait(self, job_id: str) -> None:
        self.waits.pop(job_id, None)

    def claim_restore(self, job_id: str) -> bool:
        """Mark a checkpointed job as being restored; False if it is already. Caller holds
        the lock."""
        if job_id in self.restoring:
            return False
        self.restoring.add(job_id)
        return True

    def unclaim_restore(self, job_id: str) -> None:
        self.restoring.discard(job_id)

    def begin_preemption(self, job_id: str) -> bool:
        """Make room for `job_id` by moving others; False while another preemption runs.
        Caller holds the lock."""
        if self.preempting is not None:
            return False
        self.preempting = job_id
        return True

    def begin_leaving(self, job_id: str) -> bool:
        """A borrower starts leaving lent cores; False if it is already. Caller holds the
        lock."""
        if job_id in self.leaving:
            return False
        self.leaving.add(job_id)
        return True

    def end_leaving(self, job_id: str) -> None:
        with self.lock:
            self.leaving.discard(job_id)
            self.wake()

    def end_preemption(self) -> None:
        with self.lock:
            self.preempting = None
            self.wake()

    def time_limit_reached(self, active: Active) -> None:
        """Its time limit is over: it ends TIMEOUT. Its guest is destroyed on a thread of its
        own (seconds: not under the lock); a job being moved is stopped by its mover, which
        aborts the move first. Caller holds the lock."""
        if active.stop is not None:
            return
        active.stop = (JobState.TIMEOUT,
                       f"time limit of {active.time_limit_s:g}s reached; guest stopped")
        if active.phase != Phase.MOVING:
            self.spawn(self.destroy_guest, active.host, active.job_id,
                       name=f"timeout-{active.job_id}")

    def free(self, job_id: str) -> None:
        """Its end is recorded and its QEMU is gone: free its reservation, forget it."""
        self.store.release(job_id)
        self.drop(job_id)
        self.wake()

    # --- held reservations --------------------------------------------------------------------

    def end_reservation(self, reservation_id: str, state: JobState, reason: str) -> bool:
        """End a reservation as `state` (RELEASED, or TIMEOUT when its --duration is over;
        a queued one is withdrawn: CANCELLED, or EXPIRED given as such). The jobs inside it
        are stopped first — queued ones CANCELLED, the others as `state` would have them
        (TIMEOUT for an expiry, else CANCELLED) with a reason naming the reservation, which
        `vmjob run`/`wait` print and `show` lists — and their guests waited for (bounded by
        RELEASE_SETTLE_S), so no row is given back while a guest inside still runs on it;
        then the reservation and its rows go in one transaction. Blocks for the guests'
        destruction: never call with the lock held. False if it had ended or is being ended
        by another caller (which then finishes the job)."""
        with self.lock:
            record = self.store.job(reservation_id)
            if record is None or record.state.finished or reservation_id in self.releasing:
                return False
            if record.state == JobState.QUEUED:
                withdrawn = state if state in (JobState.EXPIRED, JobState.CANCELLED) \
                    else JobState.CANCELLED
                self.store.transition(reservation_id, withdrawn, reason)
                self.forget_wait(reservation_id)
                self.wake()
                return True
            self.releasing.add(reservation_id)
        try:
            self._stop_inside(reservation_id, state, reason)
            with self.lock:
                settled = self.changed.wait_for(
                    lambda: not self.store.inside(reservation_id, UNFINISHED)
                    and not self.store.used_inside(reservation_id), RELEASE_SETTLE_S)
                if not settled:
                    log.warning("reservation %s: jobs inside still hold its rows after %gs; "
                                "released all the same", reservation_id, RELEASE_SETTLE_S)
                self.record(reservation_id, state, reason, release=True)
                log.info("reservation %s: %s (%s)", reservation_id, state.value, reason)
            # jobs submitted into it while it was being released
            self._stop_inside(reservation_id, state, reason)
        finally:
            with self.lock:
                self.releasing.discard(reservation_id)
                self.wake()
        return True

    def _stop_inside(self, reservation_id: str, state: JobState, reason: str) -> None:
        why = f"stopped: reservation {reservation_id} ended ({reason})"
        ended = JobState.TIMEOUT if state == JobState.TIMEOUT else JobState.CANCELLED
        with self.lock:
            inside = [r.id for r in self.store.inside(reservation_id, UNFINISHED)]
            guests = self.stop_without_guest(inside, JobState.CANCELLED, why)
        for job_id in guests:
            self.stop(job_id, ended, why)

    # --- waking -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed: let the scheduler and every waiter look again."""
        with self.lock:
            self.dirty = True
            self.changed.notify_all()
            for follower in self.followers:
                follower.wake()

    def spawn(self, target: Callable[..., Any], *args: Any, name: str,
              job_id: str | None = None) -> None:
        """Run `target(*args)` on a thread of its own. A worker for one job (`job_id`) that
        dies on an unexpected error ends that job FAILED instead of stranding it."""
        threading.Thread(target=self._worker, args=(target, args, job_id), name=name,
                         daemon=True).start()

    def _worker(self, target: Callable[..., Any], args: tuple[Any, ...],
                job_id: str | None) -> None:
        try:
            target(*args)
        except Exception as exc:
            where = f"job {job_id}: " if job_id else ""
            log.exception("%s%s failed", where, threading.current_thread().name)
            if job_id is not None:
                self.fail_stranded(job_id, f"vmjob failed: {type(exc).__name__}: {exc}")

    def fail_stranded(self, job_id: str, reason: str) -> None:
        """A worker acting for a job died on an unexpected error: end the job FAILED with
        `reason` and free what it holds. Its guest, if any, is destroyed first: nobody would
        collect it any more. A job being moved is left to its mover (which settles it)."""
        with self.lock:
            active = self.active.get(job_id)
            if active is None or active.phase == Phase.MOVING:
                return
            host = active.host
        self.destroy_guest(host, job_id)
        with self.lock:
            if self.active.get(job_id) is not active:
                return  # something else ended it meanwhile
            record = self.store.job(job_id)
            if record is None or record.state.finished:
                self.free(job_id)  # its end was recorded; only the release was left to do
                return
            self.finish(job_id, Verdict(JobState.FAILED, reason))

    def running_guests(self) -> list[tuple[str, str]]:
        """(job, host) of every job whose guest runs now. Caller holds the lock."""
        return [(a.job_id, a.host) for a in self.active.values() if a.phase == Phase.RUNNING]

    def queued(self) -> list[tuple[JobRecord, Request]]:
        """The queue in queue order, as the store has it now (followed by change). Caller holds
        the lock."""
        self.live.refresh()
        # the jobs this core schedules: a serving daemon's own, a direct run's one
        return [(r, q) for r, q in self.queue.follow(self.live) if self.owns(r)]

    # --- finishing --------------------------------------------------------------------------

    def finish(self, job_id: str, verdict: Verdict, release: bool = True) -> None:
        """Record a job's end and, unless its guest is still going away, free what it holds and
        forget it as active. Caller holds the lock.

        If the store cannot be written (a full spool: "database or disk is full"), the end is
        kept in `unrecorded` and retried by the scheduler (`retry_unrecorded`) until it can
        be; the job keeps its state and reservation meanwhile, and says why in `cancel`."""
        try:
            self.record(job_id, verdict.state, verdict.reason, release=release,
                        exit_code=verdict.exit_code)
        except sqlite3.OperationalError as exc:
            first = job_id not in self.unrecorded
            self.unrecorded[job_id] = Unrecorded(verdict, release, str(exc))
            if first:  # the scheduler takes the retry into its deadlines
                log.error("job %s: its end (%s: %s) could not be recorded: %s; retrying every "
                          "few seconds", job_id, verdict.state.value, verdict.reason, exc)
                self.wake()
            return
        self.unrecorded.pop(job_id, None)
        discard_periodic(self.config.spool, job_id)  # ended: nothing to restore any more
        feed = self.inputs.pop(job_id, None)
        if feed is not None:
            feed.close()
        if release:
            self.drop(job_id)
        self.metrics.finished(verdict.state)
        log.info("job %s: %s (%s)", job_id, verdict.state.value, verdict.reason)
        self.wake()

    def retry_unrecorded(self) -> None:
        """Try again to record the ends a store error held back. Caller holds the lock."""
        for job_id, pending in list(self.unrecorded.items()):
            active = self.active.get(job_id)
            # the guest's STOPPED event may have come meanwhile: then free its cores too
            release = pending.release or (active is not None and active.stopped_at is not None)
            if active is not None and not release:
                active.phase = Phase.ENDED
            self.finish(job_id, pending.verdict, release=release)

    def forget_files(self, job_id: str) -> None:
        shutil.rmtree(JobFiles.of(self.config.spool, job_id).dir, ignore_errors=True)

    # --- launching ----------------------------------------------------------------------------

    def launch(self, job_id: str) -> None:
        """Thread: write the guest's files and start it. The job is PLACED and `active`."""
        with self.lock:
            active = self.active.get(job_id)
            record = self.store.job(job_id)
            if active is None or record is None:
                return
        try:
            dom, virt_type = self._start_guest(record)
        except Exception as exc:  # any failure to start ends the job, with the reason
            message = exc.get_error_message() if isinstance(exc, VirtError) else exc
            with self.lock:
                if self.active.get(job_id) is not active:
                    return
                policy = HostLossPolicy.of(record.spec)
                if policy != HostLossPolicy.FAIL and not self.answers(active.host):
                    # its host went away under the start (before it was declared down): the
                    # job never ran, and asked not to fail for a lost host
                    self.record(job_id, JobState.QUEUED,
                                f"could not start on {active.host}, which stopped answering "
                                f"({message}); back in the queue (--on-host-loss "
                                f"{policy.value})", release=True)
                    self.drop(job_id)
                    self.wake()
                    return
                self.finish(job_id, Verdict(JobState.FAILED, f"could not start: {message}"))
            return
        with self.lock:
            if self.active.get(job_id) is not active:  # its host was lost meanwhile
                destroy_quietly(dom)
                return
            now = time.time()
            active.phase = Phase.RUNNING
            if active.time_limit_s is not None:
                active.ends_at = now + active.time_limit_s
            self.record(job_id, JobState.RUNNING, f"guest started ({virt_type})")
            if gangwire.gang_ref(record) is not None:
                self.spawn(gangwire.member_running, self, record, active.host,
                           name=f"ctl-attach-{job_id}")
            elif resizewire.serves(self, record):
                self.spawn(resizewire.running, self, record, active.host,
                           name=f"ctl-attach-{job_id}")
            self.metrics.started(now - record.created)
            stop_now = active.stop is not None
            collect_now = active.stopped_at is not None
            if collect_now:
                active.phase = Phase.COLLECTING
            self.wake()
        if collect_now:
            self.collect(active)
        elif stop_now:
            destroy_quietly(dom)  # its STOPPED event brings it to collect()

    def answers(self, host: str) -> bool:
        """Whether `host`'s connection is up and alive (a keepalive that timed out a moment
        ago may not have been reported yet)."""
        conn = self.hosts.conn(host)
        return conn is not None and is_alive(conn)

    def _start_guest(self, record: JobRecord) -> tuple[Domain, str]:
        assert record.allocation is not None
        allocation = allocation_from_dict(record.allocation)
        conn = self.hosts.conn(allocation.host)
        if conn is None:
            raise VmjobsError(f"host {allocation.host} is down")
        host_config = self.config.host(allocation.host)
        spec = record.spec
        image = resolve_image(self.config.spool, spec["image"])
        virt_type = probe.virt_type(self.config, host_config, conn, image, allocation,
                                    self.tell)
        files = JobFiles.of(self.config.spool, record.id)
        plan = GuestPlan(
            job_id=record.id, owner=record.owner, owner_uid=record.uid,
            argv=tuple(spec["argv"]), env=dict(spec.get("env") or {}),
            vmjob_env={**array_env(spec), **gang.gang_env(spec)},
            allocation=allocation, image=image, virt_type=virt_type,
            output_disk_mib=self.config.output_disk_mib,
            input_dir=self._input_of(record, files),
            emulator_cpus=host_config.reserved_cpus,
            hotplug=self._hotplug_for(allocation),
            balloon_period_s=self.config.balloon_period_s(),
            stdin=spec.get("stdin"),
            console_helper=console_helper(self.config.spool) if spec.get("stdin") else None,
        )

        plan = gangwire.member_plan_for(self, record, plan)
        plan = resizewire.plan_for(self, record, plan)

        def starting(how: str) -> None:
            with self.lock:
                self.record(record.id, JobState.STARTING, f"starting ({virt_type}, {how})")

        dom, how = template.launch(self.config.start, conn, plan, files, self.config.spool,
                                   self.tell, starting)
        return dom, f"{virt_type}, {how}"

    def _hotplug_for(self, allocation: Allocation) -> Hotplug | None:
        """Room for the guest to grow live (`vmjob resize`), with the config's `hotplug` on:
        every usable cpu of its NUMA node and `hotplug_max_mem` more memory. None for a
        fixed-size guest: hotplug off, or a job on several nodes, on hugepages or keeping
        SMT siblings idle (its guest topology cannot change)."""
        if not self.config.hotplug or len(allocation.nodes) != 1 or allocation.hugepage_kib \
                or allocation.idle_cpus:
            return None
        node = allocation.nodes[0].node
        for host in self.hosts.inventory():
            if host.name == allocation.host:
                cpus = [c for n in host.nodes if n.id == node for c in n.cpus
                        if c.id not in host.reserved_cpus]
                return Hotplug(max(len(cpus), len(allocation.cpus)),
                               self.config.hotplug_max_mem_mib)
        return None

    def _input_of(self, record: JobRecord, files: JobFiles) -> Path | None:
        """The directory the job's input is packed from. A daemon's job: its upload, in the
        job's directory. A direct run's: the user's own directory, read by the user's own
        process (the daemon never opens a user's paths)."""
        given = record.spec.get("input")
        if self.scope is not None and isinstance(given, str):
            return Path(given)
        upload = files.dir / "input"
        return upload if upload.is_dir() else None

    # --- an interactive job's input ------------------------------------------------------------

    def send_input(self, job_id: str, frames: list[bytes]) -> bool:
        """Pass encoded input frames (`vmjobs.console`) on to the job's guest, in order; they
        wait while the guest is not running yet. Blocks while the job's feed is full (the
        guest does not read). False if the job takes no input (not interactive, or ended)."""
        with self.lock:
            record = self.store.job(job_id)
            if record is None or record.state.finished or not record.spec.get("stdin"):
                return False
            feed = self.inputs.get(job_id)
            if feed is None:
                feed = self.inputs[job_id] = InputFeed(job_id,
                                                       lambda: self._input_port(job_id))
        return all(feed.put(frame) for frame in frames)

    def _input_port(self, job_id: str) -> Callable[[], InputPort] | None:
        """Waits until the job's guest runs; then what opens its input port (None: the job is
        over, or the daemon stops). Called by the job's input feed thread."""
        def decided() -> bool:
            active = self.active.get(job_id)
            if self.stopping or (active is not None and active.phase == Phase.RUNNING):
                return True
            record = self.store.job(job_id)
            return record is None or record.state.finished

        with self.lock:
            self.changed.wait_for(decided)
            active = self.active.get(job_id)
            if self.stopping or active is None or active.phase != Phase.RUNNING:
                # over without a `finish` (cancelled while queued): forget its feed here
                feed = self.inputs.pop(job_id, None)
                if feed is not None:
                    feed.close()
                return None
            host = active.host
        name = domain_name(job_id)

        def open_port() -> InputPort:
            conn = self.hosts.conn(host)
            if conn is None:
                raise VmjobsError(f"host {host} is down")
            return InputPort(conn, name)

        return open_port

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, job_id: str, state: JobState, reason: str) -> bool:
        """Ask a job to end as `state`: a queued one at once, an active one by destroying its
        guest (the STOPPED event then records it). False if it had already ended."""
        with self.lock:
            record = self.store.job(job_id)
            if record is None or record.state.finished:
                return False
            if not self.stop_without_guest([job_id], state, reason):
                return True
            active = self.active.get(job_id)
            if active is None:
                return False
            if active.stop is None:
                active.stop = (state, reason)
            running = active.phase == Phase.RUNNING
            host = active.host
        if running:
            self.destroy_guest(host, job_id)
        return True

    def stop_without_guest(self, job_ids: list[str], state: JobState, reason: str) -> list[str]:
        """End those of `job_ids` that have no guest to stop (queued, checkpointed) as `state`,
        in one store transaction, then remove their files (a checkpoint, the job directory).
        Returns the ids whose guest must be stopped (`stop`); ended jobs are skipped. Caller
        holds the lock."""
        ended: list[tuple[str, JobState]] = []
        guests: list[str] = []
        with self.store.reserving():
            for job_id in job_ids:
                record = self.store.job(job_id)
                if record is None or record.state.finished:
                    continue
                if record.state == JobState.QUEUED:
                    self.store.transition(job_id, state, reason)
                elif record.state == JobState.CHECKPOINTED and job_id not in self.restoring:
                    self.store.transition(job_id, state,
                                          f"{reason}; its checkpoint was removed")
                else:
                    guests.append(job_id)
                    continue
                ended.append((job_id, record.state))
        for job_id, was in ended:  # after the commit: a failed one keeps its files
            if was == JobState.QUEUED:
                self.forget_files(job_id)
            else:
                discard(self.config.spool, job_id)
        for job_id, _was in ended:
            self.member_ended(job_id, state, None)
        if ended:
            self.wake()
        return guests

    def ask_stop(self, job_id: str, state: JobState, reason: str) -> None:
        """`stop`, from anywhere, even a signal handler: the notes thread carries it out
        (`SimpleQueue.put` is reentrant; nothing here takes a lock)."""
        self.notes.put(StopAsked(job_id, state, reason))

    def destroy_guest(self, host: str, job_id: str) -> None:
        conn = self.hosts.conn(host)
        if conn is None:
            return
        try:
            destroy_quietly(lookup_domain(conn, domain_name(job_id)))
        except VirtError as exc:
            log.warning("job %s: destroying its guest failed: %s", job_id,
                        exc.get_error_message())

    # --- collecting ---------------------------------------------------------------------------

    def collect(self, active: Active) -> None:
        """The guest stopped (or powered itself off): read its verdict and output, record the
        end, free everything (once the guest is gone)."""
        files = JobFiles.of(self.config.spool, active.job_id)
        verdict = collect(files, active.host)
        if not verdict.reported and active.stop is not None:
            # destroyed on purpose; a job that reported an exit status finished by itself
            verdict = Verdict(*active.stop)
        with self.lock:
            if self.active.get(active.job_id) is not active:
                return
            noticed = active.powered_off_at or active.stopped_at
            if active.powered_off_at is not None and active.stopped_at is None:
                # The guest powered itself off: its verdict is final and the user hears it now;
                # its cores stay reserved until QEMU is gone (the STOPPED event), ~1 s later.
                active.phase = Phase.ENDED
                self.finish(active.job_id, verdict, release=False)
            else:
                self.finish(active.job_id, verdict)
            if noticed is not None:
                self.metrics.event_latency(time.time() - noticed)

    # --- output -------------------------------------------------------------------------------

    def watch_output(self) -> None:
        """Thread: stop the jobs whose output must stop them (`guest.OutputGuard`: past
        `output_limit`, or stalled on a full spool); they end FAILED with the reason.

        Looks every OUTPUT_CHECK_S while some job's guest runs (see there why that cadence;
        nothing else watches a running job: its end comes as a libvirt event) and sleeps on
        the condition, with no timeout, while none does."""
        watches: dict[str, OutputGuard] = {}
        while True:
            with self.lock:
                if self.stopping:
                    return
                running = [a.job_id for a in self.active.values()
                           if a.phase in (Phase.RUNNING, Phase.MOVING) and a.stop is None]
                if not running:
                    watches.clear()
                    self.changed.wait()  # a launch wakes it
                    continue
            for job_id in list(watches):
                if job_id not in running:
                    del watches[job_id]
            for job_id in running:
                watch = watches.get(job_id)
                if watch is None:
                    files = JobFiles.of(self.config.spool, job_id)
                    watch = watches[job_id] = OutputGuard(files, self.config.output_limit_bytes)
                try:
                    reason = watch.check()
                    if reason is not None:
                        log.warning("job %s: %s", job_id, reason)
                        self.stop(job_id, JobState.FAILED, reason)
                except Exception:  # never the end of this thread: the next look tries again
                    log.exception("job %s: watching its output failed", job_id)
            with self.lock:
                self.changed.wait_for(lambda: self.stopping, OUTPUT_CHECK_S)

    # --- notes from the hosts -----------------------------------------------------------------

    def notes_loop(self) -> None:
        """Thread: act on what the libvirt callbacks reported, in order."""
        while True:
            note = self.notes.get()
            if note is None:
                return
            try:
                if isinstance(note, GuestStopped):
                    self._guest_stopped(note)
                elif isinstance(note, GuestPoweredOff):
                    self._guest_powered_off(note)
                elif isinstance(note, HostDown):
                    self._host_down(note)
                elif isinstance(note, HostUp):
                    self._host_up(note)
                elif isinstance(note, HostLost):
                    self._host_lost(note)
                elif isinstance(note, StopAsked):
                    self.stop(note.job_id, note.state, note.reason)
            except Exception:
                log.exception("handling %s failed", note)

    def _guest_stopped(self, note: GuestStopped) -> None:
        with self.lock:
            active = self.active.get(note.job_id)
            if active is None or active.host != note.host or active.stopped_at is not None:
                return  # not a job of ours, or one already handled
            if active.phase == Phase.MOVING:
                return  # it left this host (migrated, saved); the mover looks where it is now
            active.stopped_at = note.at
            if note.job_id in self.unrecorded:
                return  # its end waits for room in the store; the retry frees the cores with it
            if active.phase == Phase.ENDED:  # its end was recorded at power-off: free the cores
                self.free(note.job_id)
                return
            if active.phase != Phase.RUNNING:
                # launching: launch() collects once it has recorded the start; collecting:
                # collect() sees stopped_at and frees the cores with the end
                return
            active.phase = Phase.COLLECTING
        self.spawn(self.collect, active, name=f"collect-{note.job_id}", job_id=note.job_id)

    def _guest_powered_off(self, note: GuestPoweredOff) -> None:
        """The init powered the guest off after writing the output disk: collect now rather
        than when QEMU is finally gone."""
        with self.lock:
            active = self.active.get(note.job_id)
            if active is None or active.host != note.host or active.phase != Phase.RUNNING:
                return
            active.powered_off_at = note.at
            active.phase = Phase.COLLECTING
        self.spawn(self.collect, active, name=f"collect-{note.job_id}", job_id=note.job_id)

    def _host_down(self, note: HostDown) -> None:
        """The host stopped answering: its running jobs are UNREACHABLE, not lost — libvirt is
        built so that guests outlive a libvirtd restart. They keep their reservations until the
        host returns (recovery takes them back) or stays away for `host_down_after`."""
        with self.lock:
            for active in [a for a in self.active.values() if a.host == note.host]:
                record = self.store.job(active.job_id)
                if record is None or record.state == JobState.CHECKPOINTED:
                    continue  # saved just before: its checkpoint is in the spool, not on the host
                if active.phase == Phase.ENDED:  # it ended before the host went: only free it
                    self.free(active.job_id)
                    continue
                if record.state == JobState.RUNNING:
                    self.record(
                        active.job_id, JobState.UNREACHABLE,
                        f"host {note.host} not responding: {note.why}; declared lost after "
                        f"{self.config.host_down_after_s:g}s unless it returns")
            self.metrics.host_changed(note.host, up=False)
            self.wake()

    def _host_lost(self, note: HostLost) -> None:
        """The host stayed away for `host_down_after`: each of its jobs follows its lost-host
        policy (`on_job_lost`). A job being moved is settled by its mover (`moves.settle`),
        which applies the same policy when it finds the host lost."""
        with self.lock:
            if self.hosts.is_up(note.host):
                return  # it came back just now: recovery took its jobs back
            for active in [a for a in self.active.values() if a.host == note.host]:
                record = self.store.job(active.job_id)
                if record is None:
                    continue
                if active.phase == Phase.ENDED:
                    self.free(active.job_id)
                    continue
                if active.phase == Phase.MOVING and not active.periodic:
                    continue  # the mover settles it; a move off a lost host fails there
                self.on_job_lost(record, f"host {note.host} lost: {note.why}")
            self.wake()

    def _host_up(self, note: HostUp) -> None:
        self.on_host_up(note.host)
        with self.lock:
            self.metrics.host_changed(note.host, up=True)
            self.wake()

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
            for feed in self.inputs.values():
                feed.close()
            self.inputs.clear()
            self.changed.notify_all()
            for follower in self.followers:
                follower.wake()
        self.notes.put(None)
        self.control.shutdown()
        self.hosts.close()
