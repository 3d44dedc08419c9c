"""Moving running jobs under the daemon: live migration, checkpoint, restore, drain, rebalance
and preemption.

The job-level operations are `vmjobs.migration` and `vmjobs.checkpoint`; this module makes
them safe next to the daemon's own event handling. While a job moves its `Active.phase` is
"moving": the STOPPED event its guest's departure causes on the old host (migrated, saved) is
not the job's end. When the move is over, under the daemon's lock, the job's host is updated
and its guest looked up where it now is: a guest that ended meanwhile (it finished during the
migration, or was cancelled) is collected then, so no end is ever lost between the two.

Moves are slow and run outside the daemon's lock, each with a store connection of its own
(one SQLite connection must not carry two threads' transactions).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import placement
from placement import Allocation, Checkpoint, Migrate, Repin, Request
from vmjobs import checkpoint, gang, migration, repin
from vmjobs import resize as resizing
from vmjobs.codec import request_from_dict
from vmjobs.daemon import gangwire, resizewire
from vmjobs.daemon.core import Active, Daemon, Phase, time_limit_of
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.snapshot import describe_allocation, snapshot
from vmjobs.store import Store
from vmjobs.virt import VirtError
from vmjobs.virt.conn import is_running, lookup_domain
from vmjobs.virt.hotplug import VcpuChange

log = logging.getLogger("vmjobs.daemon")
Note = Callable[[str], None]
SETTLE_S = 60.0  # how long a drain waits for a job that is still starting


@dataclass(frozen=True)
class MoveResult:
    """What happened to one job: `action` is migrated | repinned | checkpointed | restored |
    resized | failed."""

    job_id: str
    action: str
    source: str | None
    destination: str | None
    detail: str

    def to_dict(self) -> dict[str, str | None]:
        return {"job": self.job_id, "action": self.action, "from": self.source,
                "to": self.destination, "detail": self.detail}


@contextlib.contextmanager
def _own_store(daemon: Daemon) -> Iterator[Store]:
    store = Store(daemon.config.state_db, shared=True)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def moving(daemon: Daemon, job_id: str, periodic: bool = False) -> Iterator[Active]:
    """Mark a running job as moving for the duration; afterwards find its guest again.
    `periodic`: a periodic checkpoint (`Active.periodic`: a lost host does not wait for it)."""
    with daemon.lock:
        active = daemon.active.get(job_id)
        record = daemon.store.job(job_id)
        if record is None:
            raise NotFound(f"no job {job_id}")
        if active is None and record.state == JobState.RUNNING:
            raise VmjobsError(f"job {job_id} was started by 'vmjob run' without the daemon; "
                              "only the daemon's jobs can move")
        if record.inside is not None:
            raise VmjobsError(f"job {job_id} runs inside reservation {record.inside}, on its "
                              "cores: it cannot move out of it")
        if active is None or active.phase != Phase.RUNNING or record.state != JobState.RUNNING:
            what = active.phase if active is not None and active.phase != Phase.RUNNING \
                else record.state.value
            raise VmjobsError(f"job {job_id} is {what}; only a RUNNING job can move")
        active.phase = Phase.MOVING
        active.periodic = periodic
    try:
        yield active
    finally:
        active.periodic = False
        settle(daemon, active)


def settle(daemon: Daemon, active: Active) -> None:
    """After a move: the job runs where the store says, or it ended meanwhile and is collected;
    a cancel or time limit that arrived during the move is carried out now."""
    with daemon.lock:
        if daemon.active.get(active.job_id) is not active:
            return
        record = daemon.store.job(active.job_id)
        if record is None or record.state == JobState.CHECKPOINTED:
            daemon.drop(active.job_id)  # it holds nothing any more
            if record is not None and active.stop is not None:
                daemon.stop(active.job_id, *active.stop)  # cancelled while it was being saved
            daemon.wake()
            return
        active.host = record.host or active.host
        conn = daemon.hosts.conn(active.host)
        if conn is None and daemon.hosts.is_lost(active.host):
            # declared lost while it moved (`_host_lost` left it to us): its policy now
            daemon.on_job_lost(record, f"host {active.host} lost during a move")
            if daemon.active.get(active.job_id) is active:
                daemon.drop(active.job_id)
            daemon.wake()
            return
        if conn is None:
            # its host went away during the move: the guest may run on there; it is
            # UNREACHABLE until the host returns (recovery) or is declared lost
            active.phase = Phase.RUNNING
            why = f"host {active.host} not responding after a move"
            if record.state == JobState.UNREACHABLE:  # already said while it moved
                daemon.store.note(active.job_id, why)
            else:
                daemon.record(active.job_id, JobState.UNREACHABLE, why)
            daemon.wake()
            return
        try:
            dom = lookup_domain(conn, domain_name(active.job_id)) if conn is not None else None
            alive = dom is not None and is_running(dom)
        except VirtError:
            alive = False
        if record.state != JobState.RUNNING:
            daemon.record(active.job_id, JobState.RUNNING, "move over")
        if alive:
            active.phase = Phase.RUNNING
            stop = active.stop is not None
            if not stop and gangwire.gang_ref(record) is not None:  # its port, where it is now
                daemon.spawn(gangwire.member_running, daemon, record, active.host,
                             name=f"ctl-attach-{active.job_id}")
            elif not stop and resizewire.serves(daemon, record):
                daemon.spawn(resizewire.running, daemon, record, active.host,
                             name=f"ctl-attach-{active.job_id}")
        else:
            active.phase = Phase.COLLECTING
            active.stopped_at = active.stopped_at or time.time()
            stop = False
        daemon.wake()
    if not alive:
        daemon.spawn(daemon.collect, active, name=f"collect-{active.job_id}",
                     job_id=active.job_id)
    elif stop:
        daemon.spawn(daemon.destroy_guest, active.host, active.job_id,
                     name=f"stop-{active.job_id}")


def _stop_asked(active: Active) -> Callable[[], str | None]:
    """For a move in progress: the reason of a stop (cancel, time limit) recorded for the job
    since it started moving, which aborts the move; `settle` then carries the stop out on the
    guest where it still runs."""
    def asked() -> str | None:
        stop = active.stop  # set under the daemon's lock; reading the one attribute is atomic
        return stop[1] if stop is not None else None
    return asked


def policy_for(daemon: Daemon, **options: object) -> migration.Policy:
    """The convergence policy: the defaults, the config's outbound limit, the caller's
    options (None: keep the default)."""
    chosen = {k: v for k, v in options.items() if v is not None}
    return replace(migration.Policy(max_outbound=daemon.config.max_outbound_migrations),
                   **chosen)  # type: ignore[arg-type]


def migrate(daemon: Daemon, job_id: str, to: str | None, policy: migration.Policy,
            on_progress: Callable[[migration.Progress], None] | None = None,
            note: Note = lambda _m: None, replug_nics: bool = False) -> MoveResult:
    """Live-migrate a daemon job; `to` was checked against the config by the API."""
    with moving(daemon, job_id) as active, _own_store(daemon) as store:
        source = active.host
        record = store.job(job_id)
        member = record is not None and gangwire.gang_ref(record) is not None
        try:
            moved = migration.migrate_job(
                daemon.config, store, daemon.hosts.conns(), daemon.hosts.inventory(), job_id,
                to, policy, on_progress, note, replug_nics, should_abort=_stop_asked(active),
                # a gang member's network is made on the destination before the copy
                prepare_destination=lambda dest: gangwire.member_moving(
                    daemon, record, dest, keep=source) if member and record else None)
        except BaseException:
            if member and record is not None:
                gangwire.member_settled(daemon, record, source)
            raise
        if member and record is not None:
            gangwire.member_settled(daemon, record, moved.destination)
    downtime = f"{moved.outcome.downtime_ms} ms" if moved.outcome.downtime_ms is not None \
        else "?"
    return MoveResult(job_id, "migrated", source, moved.destination,
                      f"{moved.outcome.duration_s:.1f}s, downtime {downtime}, "
                      f"{describe_allocation(moved.allocation)}; clock {moved.clock}"
                      + (f"; {moved.nics}" if moved.nics else ""))


def repin_job(daemon: Daemon, job_id: str, allocation: Allocation) -> MoveResult:
    """Re-pin a running job to other cpus / NUMA nodes of its own host, live."""
    with moving(daemon, job_id) as active, _own_store(daemon) as store:
        done = repin.repin_job(daemon.config, store, daemon.hosts.conns(), job_id, allocation)
        host = active.host
    return MoveResult(job_id, "repinned", host, host,
                      f"{describe_allocation(done.after)} "
                      f"({done.memory_moved_mib} MiB changed NUMA node)")


def resize(daemon: Daemon, job_id: str, cpus: int | None, memory_mib: int | None) -> MoveResult:
    """Grow or shrink a running daemon job in place (`vmjobs.resize`). A job with cores on
    loan is refused first by the caller (`lending.before_resize`)."""
    with moving(daemon, job_id) as active, _own_store(daemon) as store:
        done = resizing.resize_job(daemon.config, store, daemon.hosts.conns(),
                                   daemon.hosts.inventory(), job_id, cpus, memory_mib)
        host = active.host
    how = "" if done.vcpus == VcpuChange.UNCHANGED else f" (vCPUs {done.vcpus})"
    return MoveResult(job_id, "resized", host, host,
                      f"{describe_allocation(done.after)}{how}; the guest sees {done.guest_cpus} "
                      f"cpus, MemTotal {done.guest_memtotal_kib >> 10} MiB")


def checkpoint_job(daemon: Daemon, job_id: str, restore: str | None = None) -> MoveResult:
    """Save the job's guest into its spool dir and free its reservation. `restore="auto"`:
    the scheduler restores it when it fits again (preempted or drained jobs)."""
    with moving(daemon, job_id) as active, _own_store(daemon) as store:
        saved = checkpoint.checkpoint_job(daemon.config, store, daemon.hosts.conns(), job_id,
                                          should_abort=_stop_asked(active))
        if restore is not None:
            store.mark(job_id, restore=restore)
        if active.ends_at is not None:  # the time limit resumes where it stopped
            store.mark(job_id, time_left_s=max(active.ends_at - time.time(), 0.0))
        record = store.job(job_id)
    if record is not None:
        gangwire.member_checkpointed(daemon, record)
    return _checkpointed(saved)


def _checkpointed(saved: checkpoint.Saved) -> MoveResult:
    return MoveResult(saved.job_id, "checkpointed", saved.host, None,
                      f"{saved.size_bytes >> 20} MiB in {saved.duration_s:.1f}s to {saved.path}")


def restore(daemon: Daemon, job_id: str, to: str | None = None,
            claimed: bool = False) -> MoveResult:
    """Restore a checkpointed job on `to` (checked by the API) or wherever it fits.
    `claimed`: the caller already put it in `daemon.restoring` (so that nobody else starts
    restoring it too)."""
    with daemon.lock:
        record = daemon.store.job(job_id)
        if record is None:
            if claimed:
                daemon.unclaim_restore(job_id)
            raise NotFound(f"no job {job_id}")
        if not claimed:
            if record.state != JobState.CHECKPOINTED:
                raise VmjobsError(f"job {job_id} is {record.state.value}, not CHECKPOINTED")
            if not daemon.claim_restore(job_id):
                raise VmjobsError(f"job {job_id} is being restored already")
    ref = gangwire.gang_ref(record)
    before: dict[int, str] = {}

    def network_there(host: str) -> None:  # a gang member's network, made on its new host
        if ref is not None:
            before.update(gangwire.members_placed(daemon, ref[0], {ref[1]: host}))

    try:
        with _own_store(daemon) as store:
            try:
                restored = checkpoint.restore_job(daemon.config, store, daemon.hosts.conns(),
                                                  daemon.hosts.inventory(), job_id, to,
                                                  prepare_host=network_there)
            except BaseException:
                if ref is not None and before:
                    gangwire.members_back(daemon, ref[0], before)
                raise
            active = _admit_restored(daemon, store, record, restored.host)
    finally:
        with daemon.lock:
            daemon.unclaim_restore(job_id)
    settle(daemon, active)
    return _restored(restored)


def _restored(restored: checkpoint.Restored) -> MoveResult:
    return MoveResult(restored.job_id, "restored", None, restored.host,
                      f"in {restored.duration_s:.1f}s, "
                      f"{describe_allocation(restored.allocation)}; clock {restored.clock}")


def _admit_restored(daemon: Daemon, store: Store, record: JobRecord, host: str) -> Active:
    """A restored job's place in the daemon, its time limit running on from what was left
    (`settle` then makes it RUNNING there)."""
    left = (store.job(record.id) or record).spec.get("time_left_s")
    store.mark(record.id, restore=None, time_left_s=None, checkpoint=None)
    with daemon.lock:
        limit = time_limit_of(record)
        active = Active(record.id, host, limit, phase=Phase.MOVING)
        if left is not None:
            active.ends_at = time.time() + float(left)
        elif limit is not None:
            active.ends_at = time.time() + limit
        daemon.admit(active)
    return active


# --- a gang at once ------------------------------------------------------------------------------

def checkpoint_gang(daemon: Daemon, gang_id: str) -> list[MoveResult]:
    """Save every member of a running gang, or none (`checkpoint.checkpoint_gang`: all paused,
    then saved). Its network keeps its slot (so the members' addresses) for the restore;
    `vmjob-ctl nodes` shows the members checkpointed."""
    with daemon.lock:
        records = gang.member_records(daemon.store, gang_id)
        if not records:
            raise NotFound(f"no gang {gang_id}")
        for record in records:  # one line for the first that is not (moving says it too)
            if record.state != JobState.RUNNING:
                raise VmjobsError(f"gang {gang_id}: member {record.id} is "
                                  f"{record.state.value}; only a gang whose members all run "
                                  "can be checkpointed")
    with contextlib.ExitStack() as stack:
        actives = [stack.enter_context(moving(daemon, r.id)) for r in records]
        store = stack.enter_context(_own_store(daemon))

        def asked() -> str | None:  # a stop of any member aborts the whole checkpoint
            return next((a.stop[1] for a in actives if a.stop is not None), None)

        saved = checkpoint.checkpoint_gang(daemon.config, store, daemon.hosts.conns(),
                                           [r.id for r in records], should_abort=asked)
        for active in actives:
            if active.ends_at is not None:  # the time limit resumes where it stopped
                store.mark(active.job_id, time_left_s=max(active.ends_at - time.time(), 0.0))
    for record in records:
        gangwire.member_checkpointed(daemon, record)
    return [_checkpointed(s) for s in saved]


def restore_gang(daemon: Daemon, gang_id: str,
                 to: list[str] | None = None) -> list[MoveResult]:
    """Restore every member of a checkpointed gang, or none (`checkpoint.restore_gang`):
    placed again together and apart, the gang's network made on the new hosts before the
    guests are restored, every member's control port attached again where it runs (`settle`).
    `to`: one host per member, in index order (checked against the config by the API)."""
    with daemon.lock:
        records = gang.member_records(daemon.store, gang_id)
        if not records:
            raise NotFound(f"no gang {gang_id}")
        for record in records:
            if record.state != JobState.CHECKPOINTED:
                raise VmjobsError(f"gang {gang_id}: member {record.id} is "
                                  f"{record.state.value}, not CHECKPOINTED")
        claimed = [r.id for r in records if daemon.claim_restore(r.id)]
        if len(claimed) < len(records):
            for job_id in claimed:
                daemon.unclaim_restore(job_id)
            raise VmjobsError(f"gang {gang_id} is being restored already")
    before: dict[int, str] = {}

    def network_there(hosts: dict[int, str]) -> None:
        before.update(gangwire.members_placed(daemon, gang_id, hosts))

    try:
        with _own_store(daemon) as store:
            try:
                restored = checkpoint.restore_gang(
                    daemon.config, store, daemon.hosts.conns(), daemon.hosts.inventory(),
                    [r.id for r in records], to, prepare_hosts=network_there)
            except BaseException:
                if before:
                    gangwire.members_back(daemon, gang_id, before)
                raise
            actives = [_admit_restored(daemon, store, record, done.host)
                       for record, done in zip(records, restored, strict=True)]
    finally:
        with daemon.lock:
            for record in records:
                daemon.unclaim_restore(record.id)
    for active in actives:
        settle(daemon, active)
    return [_restored(r) for r in restored]


# --- many jobs -----------------------------------------------------------------------------

def _failed(job_id: str, source: str | None, exc: Exception) -> MoveResult:
    return MoveResult(job_id, "failed", source, None, str(exc))


def drain(daemon: Daemon, host: str, checkpoint_unmovable: bool,
          policy: migration.Policy, note: Note = lambda _m: None) -> list[MoveResult]:
    """Cordon `host` and move every job off it: live, else (when allowed) by checkpoint."""
    daemon.config.host(host)
    cordon(daemon, host, "draining")
    note(f"{host}: cordoned; nothing new is placed there")
    results: list[MoveResult] = []
    with daemon.lock:
        daemon.changed.wait_for(
            lambda: not [a for a in daemon.active.values()
                         if a.host == host and a.phase == Phase.LAUNCHING], SETTLE_S)
        jobs = sorted(a.job_id for a in daemon.active.values()
                      if a.host == host and a.phase == Phase.RUNNING)
    for job_id in jobs:
        note(f"job {job_id}: migrating off {host}")
        try:
            results.append(migrate(daemon, job_id, None, policy, note=note))
        except VmjobsError as exc:
            if not checkpoint_unmovable:
                results.append(_failed(job_id, host, exc))
                note(f"job {job_id}: {exc}")
                continue
            note(f"job {job_id}: cannot migrate ({exc}); checkpointing it")
            try:
                results.append(checkpoint_job(daemon, job_id, restore="auto"))
            except VmjobsError as again:
                results.append(_failed(job_id, host, again))
        note(f"job {job_id}: {results[-1].action} {results[-1].detail}")
    return results


def cordon(daemon: Daemon, host: str, reason: str) -> None:
    with daemon.lock:
        daemon.store.cordon(host, reason)
        daemon.wake()


def uncordon(daemon: Daemon, host: str) -> bool:
    daemon.config.host(host)
    with daemon.lock:
        was = daemon.store.uncordon(host)
        daemon.wake()
        return was


def rebalance_plan(daemon: Daemon, max_moves: int, objective: str = "whole-nodes",
                   target_cpus: int = 16) -> placement.Plan:
    with daemon.lock:
        cluster = planning_cluster(daemon, movable=lambda _r: True)
    return placement.plan_rebalance(cluster, max_moves, objective=objective,
                                    target_cpus=target_cpus)


def carry_out(daemon: Daemon, plan: placement.Plan, policy: migration.Policy,
              note: Note = lambda _m: None) -> list[MoveResult]:
    """Carry out a plan's actions in order; stop at the first failure (later actions were
    planned on the assumption that it succeeded)."""
    results: list[MoveResult] = []
    for action in plan.actions:
        try:
            if isinstance(action, Repin):
                assert action.allocation is not None
                note(f"job {action.job_id}: re-pinning on {action.host}")
                results.append(repin_job(daemon, action.job_id, action.allocation))
            elif isinstance(action, Migrate):
                note(f"job {action.job_id}: migrating to {action.to_host}")
                results.append(migrate(daemon, action.job_id, action.to_host, policy,
                                       note=note))
            elif isinstance(action, Checkpoint):
                note(f"job {action.job_id}: checkpointing (restored when it fits again)")
                results.append(checkpoint_job(daemon, action.job_id, restore="auto"))
        except VmjobsError as exc:
            results.append(_failed(action.job_id, None, exc))
            note(f"job {action.job_id}: {exc}; the rest of the plan is dropped")
            break
        note(f"job {action.job_id}: {results[-1].action} {results[-1].detail}")
    return results


def planning_cluster(daemon: Daemon, movable: Callable[[Request], bool]) -> placement.Cluster:
    """The cluster as the planners see it: only running jobs whose request `movable` accepts
    may be moved. Caller holds the lock."""
    running = {a.job_id for a in daemon.active.values() if a.phase == Phase.RUNNING}
    return snapshot(daemon.store, daemon.hosts.inventory(),
                    pinned=lambda held: held.job_id not in running or not movable(held.request))


# --- preemption (called by the scheduler) ------------------------------------------------------

def preempt_for(daemon: Daemon, job_id: str, request: Request) -> bool:
    """The queue's head does not fit: if moving preemptible jobs makes room, start doing so in
    the background (one preemption at a time). Caller holds the lock. True if started."""
    if daemon.preempting is not None or request.preemptible:
        return False
    cluster = planning_cluster(daemon, movable=lambda r: r.preemptible)
    plan = placement.plan_to_fit(cluster, request)
    if not plan.found or not plan.actions or not daemon.begin_preemption(job_id):
        return False
    log.info("job %s: preempting for it: %s", job_id, plan.summary)
    daemon.spawn(_preempt, daemon, job_id, plan, name=f"preempt-{job_id}")
    return True


def _preempt(daemon: Daemon, job_id: str, plan: placement.Plan) -> None:
    try:
        results = carry_out(daemon, plan, policy_for(daemon),
                            note=lambda m: log.info("preemption for %s: %s", job_id, m))
        with daemon.lock:
            for result in results:
                if daemon.store.job(result.job_id) is not None:
                    daemon.store.note(result.job_id, f"preempted for job {job_id}: "
                                      f"{result.action} {result.detail}")
    except Exception:
        log.exception("preemption for job %s failed", job_id)
    finally:
        daemon.end_preemption()


def restore_waiting(daemon: Daemon) -> None:
    """Restore jobs checkpointed for others (preemption, drain) once they fit again, one at a
    time, after the queue had its turn. Caller holds the lock."""
    if daemon.restoring or daemon.preempting is not None:
        return
    candidates = [r for r in daemon.store.in_states(frozenset({JobState.CHECKPOINTED}))
                  if r.spec.get("restore") == "auto" and r.request is not None
                  and daemon.owns(r)]
    if not candidates:
        return
    cluster = planning_cluster(daemon, movable=lambda _r: False)
    for record in sorted(candidates, key=lambda r: (-int((r.request or {}).get("priority", 0)),
                                                    r.created)):
        # as restore_job places it: any host, under the job's other constraints
        request = replace(request_from_dict(record.request or {}), host=None)
        if cluster.place(request).fits and daemon.claim_restore(record.id):
            daemon.spawn(_restore_quietly, daemon, record.id, name=f"restore-{record.id}")
            return


def _restore_quietly(daemon: Daemon, job_id: str) -> None:
    try:
        result = restore(daemon, job_id, claimed=True)
        log.info("job %s: %s %s", job_id, result.action, result.detail)
    except DoesNotFit:
        return  # the room went to someone else meanwhile: tried again at the next change
    except checkpoint.CheckpointFailed as exc:
        if exc.host is None or daemon.answers(exc.host):
            _restore_by_hand(daemon, job_id, exc)
        else:  # the host chosen went away meanwhile: tried again elsewhere at the next change
            log.warning("job %s: %s; its host stopped answering: trying again", job_id, exc)
            with daemon.lock:
                daemon.store.note(job_id, f"{exc}; {exc.host} stopped answering: the "
                                          "restore is tried again on another host")
    except VmjobsError as exc:
        _restore_by_hand(daemon, job_id, exc)
    daemon.wake()


def _restore_by_hand(daemon: Daemon, job_id: str, exc: VmjobsError) -> None:
    """Not again on every change: an admin restores it by hand (`vmjob restore`)."""
    log.warning("job %s: automatic restore failed: %s", job_id, exc)
    with daemon.lock:
        daemon.store.mark(job_id, restore="manual")
        daemon.store.note(job_id, f"automatic restore failed: {exc}; restore it by hand")
