"""Lost hosts: what becomes of a job whose host is declared lost (`--on-host-loss`), and the
periodic checkpoints (`--checkpoint-every`) a `restore` job is restored from.

The policies (`vmjobs.jobs.HostLossPolicy`) and their transitions:

- fail: LOST, the job's end (as before policies existed);
- requeue: QUEUED, its reservation released in the same transaction; the scheduler places it
  again (never on the lost host while it is down) and it runs from the start, same id;
- restore: CHECKPOINTED from its last periodic checkpoint, reservation released in the same
  transaction, marked for automatic restore (`moves.restore_waiting` restores it through the
  ordinary restore path on whatever host fits); with no checkpoint yet it is requeued.

What the user reads (`vmjob logs`): the job's output files are kept in order, and a line from
vmjob (its own output file, between the lost run's and the next run's) says what happened.
A requeued job's output is the lost run's partial output, the line, then the new run's whole
output. A restored job's output is its output up to the checkpoint, the line, then the restored
run's: what the lost run printed after the checkpoint (which the restored run prints again)
is moved out of the way into `lost.<n>.out` in the job's directory, and the line says so and
how many bytes. Nothing is dropped, nothing appears twice without that line.

A host declared lost is taken for dead (fenced): should it come back with the job's old guest
still running, recovery destroys that guest (its job no longer runs there).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import BinaryIO

from vmjobs import checkpoint
from vmjobs.checkpoint import Periodic
from vmjobs.daemon.core import Daemon, Phase
from vmjobs.daemon.moves import _own_store, moving
from vmjobs.guest import JOB_FILE_MODE, JobFiles, Verdict
from vmjobs.jobs import HostLossPolicy, JobRecord, JobState, allowed
from vmjobs.spec import checkpoint_every_of

log = logging.getLogger("vmjobs.daemon")


def settle_lost(daemon: Daemon, record: JobRecord, why: str) -> None:
    """Apply `record`'s lost-host policy (`why`: "host h2 lost: ..."). Caller holds the lock;
    the job is forgotten as active (it holds nothing any more)."""
    policy = HostLossPolicy.of(record.spec)
    if policy == HostLossPolicy.FAIL or not allowed(record.state, JobState.QUEUED):
        # (a job caught in a move's middle state cannot be requeued: its end is the loss)
        daemon.finish(record.id, Verdict(JobState.LOST, why))
        return
    spool = daemon.config.spool
    files = JobFiles.of(spool, record.id)
    fallback = ""
    if policy == HostLossPolicy.RESTORE:
        taken = None
        if record.state == JobState.UNREACHABLE:  # a guest that ran (not one still starting)
            taken = checkpoint.adopt_periodic(spool, record.id, record.spec)
        if taken is not None:
            _restore_from(daemon, record, files, taken, why)
            return
        fallback = "; it had no checkpoint yet, so it runs again from the start instead"
    checkpoint.discard_periodic(spool, record.id)
    at = time.strftime("%H:%M:%S", time.localtime())
    note_output(files, f"vmjob: {why} ({at}); the job runs again from the start "
                       f"(--on-host-loss {policy.value}{fallback}); the output above is the "
                       "lost run's\n")
    daemon.record(record.id, JobState.QUEUED,
                  f"{why}; back in the queue (--on-host-loss {policy.value}{fallback}): it "
                  "runs again from the start on another host", release=True)
    daemon.store.mark(record.id, checkpoint=None, time_left_s=None, restore=None)
    daemon.drop(record.id)
    log.warning("job %s: %s; requeued%s", record.id, why, fallback)
    daemon.wake()


def _restore_from(daemon: Daemon, record: JobRecord, files: JobFiles, taken: Periodic,
                  why: str) -> None:
    moved, kept = set_aside_after(files, taken)
    at = time.strftime("%H:%M:%S", time.localtime(taken.at))
    kept_text = (f"; the {moved} bytes the lost run printed after it are in {', '.join(kept)} "
                 "(the restored run prints them again below)" if moved else "")
    note_output(files, f"vmjob: {why}; restored from its checkpoint of {at} "
                       f"(--on-host-loss restore){kept_text}\n")
    daemon.record(record.id, JobState.CHECKPOINTED,
                  f"{why}; restoring from periodic checkpoint {taken.seq} of {at} "
                  f"(--on-host-loss restore){kept_text}", release=True)
    daemon.store.mark(record.id, restore="auto", checkpoint=None,
                      time_left_s=taken.time_left_s)
    daemon.drop(record.id)
    log.warning("job %s: %s; to be restored from checkpoint %d", record.id, why, taken.seq)
    daemon.wake()


def set_aside_after(files: JobFiles, taken: Periodic) -> tuple[int, list[str]]:
    """Move what the job printed after checkpoint `taken` out of its output (into
    `lost.<n>.out` files of its directory, which `vmjob logs` does not read): the tail of the
    output file the checkpoint ended in, and any later output file. Returns (bytes moved,
    file names)."""
    moved, kept = 0, []
    for index in files.output_indexes():
        if index < taken.output_index:
            continue
        path = files.output(index)
        start = taken.output_bytes if index == taken.output_index else 0
        size = path.stat().st_size
        if size <= start:
            continue
        side = files.dir / f"lost.{index}.out"
        with path.open("rb") as source, _create(side) as out:
            source.seek(start)
            while chunk := source.read(1 << 20):
                out.write(chunk)
        os.truncate(path, start)
        moved += size - start
        kept.append(side.name)
    return moved, kept


def note_output(files: JobFiles, text: str) -> Path:
    """Add a line of vmjob's own to the job's output, as an output file of its own after the
    existing ones (the next guest process writes the one after it)."""
    index = max(files.output_indexes(), default=-1) + 1
    path = files.output(index)
    with _create(path) as out:
        out.write(text.encode())
    return path


def _create(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOB_FILE_MODE)
    return os.fdopen(fd, "wb")


# --- periodic checkpoints ----------------------------------------------------------------------

class Checkpointer:
    """Thread: takes the periodic checkpoints of running `--checkpoint-every` jobs, one at a
    time (each pauses its guest briefly). Its state: since when each job's next checkpoint is
    counted (its first sight running, or its last checkpoint, taken or failed)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.since: dict[str, float] = {}

    def run(self) -> None:
        daemon = self.daemon
        while True:
            with daemon.lock:
                if daemon.stopping:
                    return
                job_id, wait = self._next(time.monotonic())
                if job_id is None:
                    daemon.changed.wait(wait)
                    continue
            self.take(job_id)

    def _next(self, now: float) -> tuple[str | None, float | None]:
        """The job due for a checkpoint now, or how long until one may be (None: no job
        asks for any; a launch or restore wakes the thread). Caller holds the lock."""
        wait: float | None = None
        running = {}
        for active in self.daemon.active.values():
            if active.phase != Phase.RUNNING or active.stop is not None:
                continue
            record = self.daemon.store.job(active.job_id)
            if record is None or record.state != JobState.RUNNING:
                continue
            every = checkpoint_every_of(record.spec)
            if every is None:
                continue
            running[active.job_id] = every
        for gone in set(self.since) - set(running):
            del self.since[gone]
        for job_id, every in running.items():
            left = self.since.setdefault(job_id, now) + every - now
            if left <= 0:
                return job_id, None
            wait = left if wait is None else min(wait, left)
        return None, wait

    def take(self, job_id: str) -> Periodic | None:
        """Checkpoint one job now; None if it failed (the previous checkpoint kept, the job
        running on; its events say why) or was left behind because its host stopped answering.

        The checkpoint runs on a thread of its own, waited for while its host is up: a libvirt
        call on a host that vanished can hang for good (libvirt 9.0 wakes only one of the
        calls waiting on a connection whose keepalive expired), and this thread must go on
        with the other jobs' checkpoints. A checkpoint left behind keeps its job MOVING, with
        `Active.periodic`, so the host's loss settles the job without waiting for it."""
        daemon = self.daemon
        with daemon.lock:
            active_now = daemon.active.get(job_id)
            host = active_now.host if active_now is not None else None
        done: queue.SimpleQueue[Periodic | Exception] = queue.SimpleQueue()

        def work() -> None:
            try:
                with moving(daemon, job_id, periodic=True) as active, \
                        _own_store(daemon) as store:
                    done.put(checkpoint.periodic_checkpoint(daemon.config, store,
                                                            daemon.hosts.conns(), job_id,
                                                            active.ends_at))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
                done.put(exc)

        threading.Thread(target=work, name=f"periodic-{job_id}", daemon=True).start()
        try:
            while True:
                try:
                    result = done.get(timeout=0.5)
                    break
                except queue.Empty:
                    if host is not None and not daemon.hosts.is_up(host):
                        log.warning("job %s: periodic checkpoint left behind: host %s stopped "
                                    "answering during it", job_id, host)
                        return None
            if isinstance(result, Exception):
                raise result
            log.info("job %s: periodic checkpoint %d taken", job_id, result.seq)
            return result
        except Exception as exc:  # never the end of this thread
            log.warning("job %s: periodic checkpoint failed: %s", job_id, exc)
            with daemon.lock:
                record = daemon.store.job(job_id)
                if record is not None and not record.state.finished:
                    daemon.store.note(job_id, f"periodic checkpoint failed: {exc}; the "
                                              "previous one is kept")
            return None
        finally:
            with daemon.lock:
                if job_id in self.since:
                    self.since[job_id] = time.monotonic()

