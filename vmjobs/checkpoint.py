"""Checkpoint a running job's guest to its spool directory, and restore it on any host.

`checkpoint_job`: RUNNING -> CHECKPOINTING -> `virDomainSave` into
`<spool>/jobs/<id>/checkpoint.save` -> CHECKPOINTED with the reservation released, in one
transaction. A save that fails leaves the guest running (libvirt resumes it) and the job
RUNNING; a partial file is removed. A stop asked for during the save (`should_abort`: a cancel,
a time limit) aborts it the same way, so the caller acts on the running guest at once.

`restore_job`: place again under the job's original request (NUMA policy, NICs, pool; any
host, or `to`), reserve, rewrite the save image's XML for the new host with
`virt.migration.retarget_xml` (the new host's vcpupin/numatune, the new console segment), restore
with `restoreFlags(path, dxml)`, set the guest's wall clock, remove the file. A restore that
fails releases the new reservation and leaves the job CHECKPOINTED with its file.

`periodic_checkpoint` (`--checkpoint-every`): the guest paused, the length of its output so
far noted, its state written to `periodic.<seq>.save` (an external memory snapshot, the same
format), the guest resumed — it runs on. Only once the new file is complete is it recorded
(the spec's `checkpoint` field) and the older ones removed; a failed one removes its partial
file and keeps the previous. `adopt_periodic` makes the last one the job's checkpoint
(`checkpoint.save`) when its host is lost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import placement
from placement import Allocation
from placement.gang import place_gang
from vmjobs import failpoints
from vmjobs.codec import request_from_dict
from vmjobs.config import Config
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError
from vmjobs.guest import JobFiles
from vmjobs.jobs import JobState, domain_name
from vmjobs.migration import running_job
from vmjobs.snapshot import snapshot
from vmjobs.store import Store
from vmjobs.virt import Connection, Domain, VirtError, domains, guestclock
from vmjobs.virt.conn import destroy_quietly, is_running, lookup_domain
from vmjobs.virt.migration import retarget_xml

SAVE_FILE = "checkpoint.save"
PERIODIC_GLOB = "periodic.*.save"


class CheckpointFailed(VmjobsError):
    """A save, periodic checkpoint or restore that did not happen; `host`: where a restore
    was tried (the caller may try again elsewhere if that host stopped answering)."""

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


def save_path(spool: Path, job_id: str) -> Path:
    return JobFiles.of(spool, job_id).dir / SAVE_FILE


@dataclass(frozen=True)
class Saved:
    job_id: str
    host: str
    path: Path
    size_bytes: int
    duration_s: float


@dataclass(frozen=True)
class Restored:
    job_id: str
    host: str
    allocation: Allocation
    duration_s: float
    clock: str


def _abort_when_asked(dom: Domain, should_abort: Callable[[], str | None],
                      done: threading.Event, asked: list[str], poll_s: float = 0.25) -> None:
    """Thread: while a save runs, abort it (`abortJob`) once `should_abort` gives a reason,
    which is appended to `asked`."""
    while not done.wait(poll_s):
        failpoints.hit("checkpoint:saving")
        reason = should_abort()
        if reason:
            asked.append(reason)
            # the save may have ended meanwhile: the caller sees how
            domains.abort_job_quietly(dom)
            return


def _save(dom: Domain, path: Path, job_id: str,
          should_abort: Callable[[], str | None]) -> str | None:
    """`domains.save` with `_abort_when_asked` watching; None once saved, else why not (the
    partial file removed; libvirt left the guest as it was)."""
    done, asked = threading.Event(), []
    watcher = threading.Thread(target=_abort_when_asked, args=(dom, should_abort, done, asked),
                               name=f"save-abort-{job_id}", daemon=True)
    watcher.start()
    try:
        domains.save(dom, path)
        return None
    except VirtError as exc:
        path.unlink(missing_ok=True)
        return f"stopped: {asked[0]}" if asked else exc.get_error_message()
    finally:
        done.set()


def checkpoint_job(config: Config, store: Store, conns: Mapping[str, Connection],
                   job_id: str, should_abort: Callable[[], str | None] = lambda: None) -> Saved:
    record, _alloc = running_job(store, job_id)
    host = record.host or ""
    dom = lookup_domain(conns[host], domain_name(job_id))
    if dom is None or not is_running(dom):
        raise VmjobsError(f"job {job_id}'s guest is not running on {host}")
    path = save_path(config.spool, job_id)
    store.transition(job_id, JobState.CHECKPOINTING, f"saving to {path}")
    started = time.monotonic()
    why = _save(dom, path, job_id, should_abort)
    if why is not None:
        still = "still running" if is_running(dom) else "NOT running"
        store.transition(job_id, JobState.RUNNING, f"checkpoint failed: {why}; {still} on {host}")
        raise CheckpointFailed(f"job {job_id}: checkpoint failed: {why}; "
                               f"the job is {still} on {host}") from None
    failpoints.hit("checkpoint:saved")
    duration = time.monotonic() - started
    size = path.stat().st_size
    store.transition(job_id, JobState.CHECKPOINTED,
                     f"saved on {host} in {duration:.1f}s ({size >> 20} MiB); reservation "
                     "released", release=True)
    return Saved(job_id, host, path, size, duration)


def _checkpointed(config: Config, store: Store, conns: Mapping[str, Connection],
                  job_id: str, to: str | None) -> tuple[placement.Request, Path]:
    """A CHECKPOINTED job's request (on `to`, or any host) and its save file; VmjobsError
    (NotFound) naming what is wrong."""
    record = store.job(job_id)
    if record is None:
        raise NotFound(f"unknown job {job_id!r}")
    if record.state != JobState.CHECKPOINTED:
        raise VmjobsError(f"job {job_id} is {record.state.value}, not CHECKPOINTED")
    path = save_path(config.spool, job_id)
    if not path.exists():
        raise VmjobsError(f"job {job_id}: its checkpoint {path} is missing")
    if record.request is None:
        raise VmjobsError(f"job {job_id} has no recorded request; it cannot be placed again")
    if to is not None and to not in conns:  # a configured host (the API checked) that is down
        raise VmjobsError(f"host {to} is not reachable")
    return replace(request_from_dict(record.request), host=to), path


def _restore_onto(config: Config, store: Store, conn: Connection, job_id: str,
                  alloc: Allocation, path: Path, paused: bool = False) -> None:
    """Restore the save image at `path` on `alloc`'s host, re-pinned to `alloc`, its console
    and output port on their next segments. VirtError if libvirt refuses."""
    xml = domains.saved_xml(conn, path)
    files = JobFiles.of(config.spool, job_id)
    dxml = retarget_xml(xml, alloc, config.host(alloc.host).reserved_cpus,
                        files.next_console(store.ran_on(job_id), alloc.host), files.new_output())
    domains.restore(conn, path, dxml, paused=paused)


def restore_job(config: Config, store: Store, conns: Mapping[str, Connection],
                hosts: list[placement.Host], job_id: str, to: str | None = None,
                prepare_host: Callable[[str], None] = lambda _host: None) -> Restored:
    """`prepare_host(host)`: called once the job is placed on `host`, before its guest is
    restored there (a gang member's network is made there); an exception fails the restore
    like any other (the caller undoes what it made)."""
    request, path = _checkpointed(config, store, conns, job_id, to)
    with store.reserving():
        decision = snapshot(store, hosts).place(request)
        if decision.allocation is None:
            raise DoesNotFit(f"no room to restore job {job_id} on {to or 'any host'}: "
                             f"{decision.explanation.summary}")
        alloc = decision.allocation
        store.assign(job_id, alloc, f"placed to restore on {alloc.host}")
    conn = conns[alloc.host]
    started = time.monotonic()
    try:
        store.transition(job_id, JobState.RESTORING, f"restoring on {alloc.host}")
        failpoints.hit("restore:placed")
        prepare_host(alloc.host)
        _restore_onto(config, store, conn, job_id, alloc, path)
    except BaseException as exc:
        destroy_quietly(lookup_domain(conn, domain_name(job_id)))
        message = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
        store.transition(job_id, JobState.CHECKPOINTED,
                         f"restore on {alloc.host} failed: {message}", release=True)
        if isinstance(exc, VmjobsError | VirtError):
            raise CheckpointFailed(f"job {job_id}: restore on {alloc.host} failed: {message}; "
                                   f"the checkpoint is kept", host=alloc.host) from None
        raise
    failpoints.hit("restore:restored")
    duration = time.monotonic() - started
    clock = guestclock.sync_quietly(conn, domain_name(job_id))
    path.unlink(missing_ok=True)
    store.transition(job_id, JobState.RUNNING,
                     f"restored on {alloc.host} in {duration:.1f}s; clock {clock}")
    return Restored(job_id, alloc.host, alloc, duration, clock)


# --- a gang: every member saved, or none; every member restored, or none ----------------------

@dataclass(frozen=True)
class _Member:
    job_id: str
    host: str
    alloc: Allocation
    path: Path


def _guest(conns: Mapping[str, Connection], member: _Member) -> Domain | None:
    """The member's guest on its host; None if absent or its host cannot be asked."""
    conn = conns.get(member.host)
    try:
        return lookup_domain(conn, domain_name(member.job_id)) if conn is not None else None
    except VirtError:
        return None


def checkpoint_gang(config: Config, store: Store, conns: Mapping[str, Connection],
                    job_ids: Sequence[str],
                    should_abort: Callable[[], str | None] = lambda: None) -> list[Saved]:
    """Save every member of a gang (`job_ids`, all RUNNING), or none.

    Every member is paused first, then saved one after the other, so no member runs ahead
    while the others are written (a barrier or a kv value cannot be passed half-way). The
    members keep their reservations until every save is complete; then all become
    CHECKPOINTED with their reservations released in one transaction. If a save fails (or
    `should_abort` gives a reason), the members saved so far are restored in place (their
    reservations are still theirs), every member is resumed and RUNNING again, and
    CheckpointFailed is raised with one line; a member whose restore in place failed too is
    left CHECKPOINTED with its file (the line says so). VmjobsError, with nothing done, when a
    member is not RUNNING or its guest is not running."""
    members = []
    for job_id in job_ids:
        record, alloc = running_job(store, job_id)
        member = _Member(job_id, record.host or "", alloc, save_path(config.spool, job_id))
        dom = _guest(conns, member)
        if dom is None or not is_running(dom):
            raise VmjobsError(f"job {job_id}'s guest is not running on {member.host}; "
                              "no member was saved")
        members.append((member, dom))
    started = time.monotonic()
    paused: list[Domain] = []
    for member, dom in members:
        try:
            domains.pause(dom)
        except VirtError as exc:
            for other in paused:
                _resume_quietly(other)
            raise CheckpointFailed(f"gang checkpoint failed: {member.job_id} could not be "
                                   f"paused ({exc.get_error_message()}); every member runs "
                                   "on") from None
        paused.append(dom)
    with store.reserving():
        for member, _dom in members:
            store.transition(member.job_id, JobState.CHECKPOINTING,
                             f"saving to {member.path} (every member of its gang paused)")
    saved: list[tuple[_Member, float]] = []
    for member, dom in members:
        begun = time.monotonic()
        why = _save(dom, member.path, member.job_id, should_abort)
        if why is not None:
            _undo_gang_save(config, store, conns, [m for m, _ in members],
                            [m for m, _ in saved], f"{member.job_id} on {member.host}: {why}")
        saved.append((member, time.monotonic() - begun))
    failpoints.hit("checkpoint:saved")
    duration = time.monotonic() - started
    done = []
    with store.reserving():
        for member, took in saved:
            size = member.path.stat().st_size
            store.transition(member.job_id, JobState.CHECKPOINTED,
                             f"saved on {member.host} in {took:.1f}s ({size >> 20} MiB), the "
                             f"gang's {len(saved)} members in {duration:.1f}s; reservation "
                             "released", release=True)
            done.append(Saved(member.job_id, member.host, member.path, size, took))
    return done


def _undo_gang_save(config: Config, store: Store, conns: Mapping[str, Connection],
                    members: list[_Member], saved: list[_Member], why: str) -> NoReturn:
    """A gang's save failed at `why`: restore the `saved` members in place (paused), resume
    every member, RUNNING again; raise CheckpointFailed saying so."""
    kept = []
    for member in saved:
        conn = conns.get(member.host)
        try:
            if conn is None:
                raise VmjobsError(f"host {member.host} is not reachable")
            _restore_onto(config, store, conn, member.job_id, member.alloc, member.path,
                          paused=True)
            member.path.unlink(missing_ok=True)
        except (VirtError, VmjobsError, OSError) as exc:
            message = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
            kept.append((member, message))
    stuck = {m.job_id for m, _ in kept}
    with store.reserving():
        for member in members:
            if member.job_id in stuck:
                store.transition(member.job_id, JobState.CHECKPOINTED,
                                 f"gang checkpoint failed ({why}); its restore in place failed "
                                 "too: it stays checkpointed", release=True)
    for member in members:
        if member.job_id in stuck:
            continue
        dom = _guest(conns, member)
        if dom is not None:
            _resume_quietly(dom)
        conn = conns.get(member.host)
        clock = "kept" if member not in saved else "not set (host not reachable)" \
            if conn is None else guestclock.sync_quietly(conn, domain_name(member.job_id))
        store.transition(member.job_id, JobState.RUNNING,
                         f"gang checkpoint failed ({why}); running on {member.host} again; "
                         f"clock {clock}")
    left = "; ".join(f"{m.job_id} stays CHECKPOINTED ({message})" for m, message in kept)
    raise CheckpointFailed(f"gang checkpoint failed: {why}; "
                           + (f"{left}; the others run on" if kept else "every member runs on"))


def restore_gang(config: Config, store: Store, conns: Mapping[str, Connection],
                 hosts: list[placement.Host], job_ids: Sequence[str],
                 to: Sequence[str | None] | None = None,
                 prepare_hosts: Callable[[dict[int, str]], None] = lambda _hosts: None,
                 ) -> list[Restored]:
    """Restore every member of a checkpointed gang (`job_ids`, in index order), or none.

    The members are placed again together (`placement.gang.place_gang` under their stored
    requests, members kept apart as when they started; `to[i]`: member i's host, or any)
    and reserved in one transaction. `prepare_hosts({index: host})` is called before any
    guest is restored (the gang's network is made on the new hosts). Every member is
    restored paused, then all are resumed, so none runs before the others are back; their
    save files are removed only then.

    Raises DoesNotFit (nothing reserved) when the gang does not fit, CheckpointFailed when a
    restore failed: the members restored so far are destroyed before they ran, every member is
    CHECKPOINTED again with its file, its reservation released. VmjobsError for a member that
    is not CHECKPOINTED or has no file (nothing done)."""
    wanted = list(to) if to is not None else [None] * len(job_ids)
    if len(wanted) != len(job_ids):
        raise VmjobsError(f"the gang has {len(job_ids)} members: give one host per member, "
                          f"not {len(wanted)}")
    checked = [_checkpointed(config, store, conns, job_id, host)
               for job_id, host in zip(job_ids, wanted, strict=True)]
    with store.reserving():
        decision = place_gang(snapshot(store, hosts), [r for r, _ in checked],
                              names=list(job_ids))
        if decision.allocations is None:
            raise DoesNotFit(f"no room to restore the gang of {len(job_ids)}: "
                             f"{decision.reason}")
        members = [_Member(job_id, alloc.host, alloc, path) for job_id, alloc, (_r, path)
                   in zip(job_ids, decision.allocations, checked, strict=True)]
        for member in members:
            store.assign(member.job_id, member.alloc,
                         f"placed to restore on {member.host} with its gang")
            store.transition(member.job_id, JobState.RESTORING,
                             f"restoring on {member.host} with its gang")
    started = time.monotonic()
    step, at = "its network", None
    try:
        failpoints.hit("restore:placed")
        prepare_hosts({i: m.host for i, m in enumerate(members)})
        for member in members:
            step, at = member.job_id, member.host
            conn = conns.get(member.host)
            if conn is None:
                raise VmjobsError(f"host {member.host} is not reachable")
            _restore_onto(config, store, conn, member.job_id, member.alloc, member.path,
                          paused=True)
    except BaseException as exc:
        for member in members:  # those restored never ran: their files still hold them
            destroy_quietly(_guest(conns, member))
        message = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
        where = f"{step} on {at}" if at is not None else step
        with store.reserving():
            for member in members:
                store.transition(member.job_id, JobState.CHECKPOINTED,
                                 f"gang restore failed ({where}: {message})", release=True)
        if isinstance(exc, VmjobsError | VirtError):
            raise CheckpointFailed(f"gang restore failed: {where}: {message}; every member "
                                   "stays CHECKPOINTED", host=at) from None
        raise
    failpoints.hit("restore:restored")
    unresumed: dict[str, str] = {}
    for member in members:
        try:  # a guest that ended meanwhile is the daemon's events' to report
            dom = lookup_domain(conns[member.host], domain_name(member.job_id))
            if dom is not None:
                domains.resume(dom)
        except VirtError as exc:
            unresumed[member.job_id] = f"; not resumed: {exc.get_error_message()}"
    duration = time.monotonic() - started
    done = []
    for member in members:
        clock = guestclock.sync_quietly(conns[member.host], domain_name(member.job_id))
        member.path.unlink(missing_ok=True)
        store.transition(member.job_id, JobState.RUNNING,
                         f"restored on {member.host} with its gang of {len(members)} in "
                         f"{duration:.1f}s; clock {clock}{unresumed.get(member.job_id, '')}")
        done.append(Restored(member.job_id, member.host, member.alloc, duration, clock))
    return done


def discard(spool: Path, job_id: str) -> bool:
    """Remove a checkpoint (cancelling a CHECKPOINTED job); True if there was one."""
    path = save_path(spool, job_id)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


@dataclass(frozen=True)
class Periodic:
    """A periodic checkpoint as the job's spec records it (`checkpoint`): its file (in the
    job's directory), when it was taken (time.time()), the job's output up to then (output
    file index, bytes in it), the job's time limit left then (seconds, or None)."""

    seq: int
    file: str
    at: float
    output_index: int
    output_bytes: int
    time_left_s: float | None

    def to_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "file": self.file, "at": self.at,
                "output": [self.output_index, self.output_bytes],
                "time_left_s": self.time_left_s}

    @classmethod
    def from_dict(cls, data: object) -> Periodic | None:
        """The record, or None for a missing or malformed one (no checkpoint to use)."""
        if not isinstance(data, dict):
            return None
        try:
            index, size = data["output"]
            left = data.get("time_left_s")
            return cls(int(data["seq"]), str(data["file"]), float(data["at"]), int(index),
                       int(size), None if left is None else float(left))
        except (KeyError, TypeError, ValueError):
            return None


def periodic_checkpoint(config: Config, store: Store, conns: Mapping[str, Connection],
                        job_id: str, ends_at: float | None = None) -> Periodic:
    """Checkpoint a RUNNING job's guest and let it run on (see the module's docstring).
    `ends_at`: when its time limit stops it (time.time()), to record the time left. Its state
    stays RUNNING; an event (a note) says the checkpoint was taken. Raises CheckpointFailed
    (the previous checkpoint kept, the guest running) or VmjobsError if the guest is not
    running."""
    record, _alloc = running_job(store, job_id)
    host = record.host or ""
    dom = lookup_domain(conns[host], domain_name(job_id))
    if dom is None or not is_running(dom):
        raise VmjobsError(f"job {job_id}'s guest is not running on {host}")
    files = JobFiles.of(config.spool, job_id)
    last = Periodic.from_dict(record.spec.get("checkpoint"))
    seq = last.seq + 1 if last is not None else 1
    path = files.dir / f"periodic.{seq}.save"
    started = time.monotonic()
    domains.pause(dom)
    try:
        # paused, QEMU writes no more output for the guest: what the files hold now is what
        # the job printed before the checkpoint (output still queued in the guest is in the
        # checkpoint and is written by the restored guest)
        index = max(files.output_indexes(), default=0)
        size = files.output(index).stat().st_size if files.output(index).exists() else 0
        at = time.time()
        domains.snapshot_memory(dom, path)
    except VirtError as exc:
        path.unlink(missing_ok=True)
        _resume_quietly(dom)
        raise CheckpointFailed(f"job {job_id}: periodic checkpoint failed: "
                               f"{exc.get_error_message()}; the previous one is kept") from None
    except BaseException:
        path.unlink(missing_ok=True)
        _resume_quietly(dom)
        raise
    _resume_quietly(dom)
    duration = time.monotonic() - started
    taken = Periodic(seq, path.name, at, index, size,
                     None if ends_at is None else max(ends_at - at, 0.0))
    store.mark(job_id, checkpoint=taken.to_dict())
    store.note(job_id, f"periodic checkpoint {seq} taken on {host} in {duration:.1f}s "
                       f"({path.stat().st_size >> 20} MiB); the job runs on")
    for older in files.dir.glob(PERIODIC_GLOB):  # only now that the new one is complete
        if older.name != path.name:
            older.unlink(missing_ok=True)
    return taken


def _resume_quietly(dom: Domain) -> None:
    # gone meanwhile (its end or its host's): the daemon's events say which
    with contextlib.suppress(VirtError):
        domains.resume(dom)


def adopt_periodic(spool: Path, job_id: str, spec: Mapping[str, object]) -> Periodic | None:
    """Make the job's last periodic checkpoint (its spec's `checkpoint`) its checkpoint
    (`save_path`), for a restore after its host was lost; None when it has none (never taken,
    or its file is gone)."""
    taken = Periodic.from_dict(spec.get("checkpoint"))
    if taken is None:
        return None
    source = JobFiles.of(spool, job_id).dir / taken.file
    if not source.is_file():
        return None
    source.replace(save_path(spool, job_id))
    return taken


def discard_periodic(spool: Path, job_id: str) -> None:
    """Remove the job's periodic checkpoints (it ended, or runs again from the start)."""
    for path in JobFiles.of(spool, job_id).dir.glob(PERIODIC_GLOB):
        path.unlink(missing_ok=True)
