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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import placement
from placement import Allocation
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
    done, asked = threading.Event(), []
    watcher = threading.Thread(target=_abort_when_asked, args=(dom, should_abort, done, asked),
                               name=f"save-abort-{job_id}", daemon=True)
    watcher.start()
    try:
        domains.save(dom, path)
    except VirtError as exc:
        path.unlink(missing_ok=True)
        still = "still running" if is_running(dom) else "NOT running"
        why = f"stopped: {asked[0]}" if asked else exc.get_error_message()
        store.transition(job_id, JobState.RUNNING, f"checkpoint failed: {why}; {still} on {host}")
        raise CheckpointFailed(f"job {job_id}: checkpoint failed: {why}; "
                               f"the job is {still} on {host}") from None
    finally:
        done.set()
    failpoints.hit("checkpoint:saved")
    duration = time.monotonic() - started
    size = path.stat().st_size
    store.transition(job_id, JobState.CHECKPOINTED,
                     f"saved on {host} in {duration:.1f}s ({size >> 20} MiB); reservation "
                     "released", release=True)
    return Saved(job_id, host, path, size, duration)


def restore_job(config: Config, store: Store, conns: Mapping[str, Connection],
                hosts: list[placement.Host], job_id: str, to: str | None = None) -> Restored:
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
    request = replace(request_from_dict(record.request), host=to)
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
        xml = domains.saved_xml(conn, path)
        files = JobFiles.of(config.spool, job_id)
        dxml = retarget_xml(xml, alloc, config.host(alloc.host).reserved_cpus,
                            files.next_console(store.ran_on(job_id), alloc.host),
                            files.new_output())
        domains.restore(conn, path, dxml)
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
