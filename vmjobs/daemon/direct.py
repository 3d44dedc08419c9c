"""A direct `vmjob run` (no daemon answers): the daemon's own core, in this process, for this
one job.

The same `Daemon` a `vmjob serve` runs, scoped to the run's job (`Daemon(config, scope=id)`):
the job is submitted and placed by one scheduling pass (`scheduler.start_now_or_forget`, as
`--no-wait`: a direct run never waits), launched by `Daemon.launch`, ended by the hosts'
lifecycle events and `Daemon.collect`, stopped by `Daemon.stop` (Ctrl+C, SIGTERM) or the
scheduler's time limit, its output read by `logs.stream` — so a job ends with the same state,
message and exit code in both modes. No socket is opened and the spool's daemon lock is not
taken (a daemon may serve the same spool meanwhile; the store's `BEGIN IMMEDIATE` keeps the
two from booking the same core). The core acts on its own job only (`Daemon.owns`): no other
job is scheduled, timed or recovered by it — except that runs whose process died are reaped
(`recovery.reap_abandoned`), as nobody else follows them.
"""

from __future__ import annotations

import codecs
import os
import pwd
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from placement import Allocation
from vmjobs.codec import allocation_from_dict
from vmjobs.config import Config
from vmjobs.daemon import logs, scheduler
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.queue import FIRST_IN_LINE
from vmjobs.daemon.recovery import reap_abandoned, runner_identity
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.guest import JobFiles
from vmjobs.image import resolve_image
from vmjobs.jobs import JobRecord, JobState, new_job_id
from vmjobs.outcome import (
    cancelled_line,
    end_line,
    ended_with_output,
    exit_code,
    interrupted_exit,
)
from vmjobs.snapshot import describe_allocation
from vmjobs.spec import Spec
from vmjobs.virt.events import start_event_loop

# How long the end of a job may take to free its cores (QEMU gone: ~1.2 s under TCG here)
# before its guest is destroyed to make sure.
RELEASE_WAIT_S = 60.0


def run(config: Config, spec: Spec, write: Callable[[str], None],
        note: Callable[[str], None]) -> int:
    """Run one job to its end in this process; the exit code `vmjob run` exits with.

    `write` gets the job's stdout and stderr as text as it arrives (chunks, not lines; a
    character split between reads is decoded whole); `note` gets vmjob's own one-line
    messages. Raises VmjobsError (one line) when the job cannot start now — nothing of it is
    left then: no row, no directory."""
    image = resolve_image(config.spool, spec.image)
    request = spec.request()
    start_event_loop()  # before the first connection, or no lifecycle events arrive
    job_id = new_job_id()
    daemon = Daemon(config, scope=job_id, tell=note)
    # the same threads as `vmjob serve` (daemon.main), less the socket
    threads = [threading.Thread(target=daemon.notes_loop, name="notes", daemon=True),
               threading.Thread(target=scheduler.run, args=(daemon,), name="scheduler",
                                daemon=True),
               threading.Thread(target=daemon.watch_output, name="output", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        for host, error in daemon.hosts.connect_once(request.host).items():
            note(f"{error}; not placing on {host}")
        for reaped in reap_abandoned(daemon):
            note(f"job {reaped}: its vmjob process had died; guest stopped, reservation freed")
        daemon.refuse_never_fitting(request)
        user = pwd.getpwuid(os.getuid()).pw_name
        record = JobRecord(id=job_id, owner=user, uid=os.getuid(), state=JobState.QUEUED,
                           spec={**spec.to_dict(), "image": image.id,
                                 "runner": runner_identity()})
        with _cancel_on_signal(daemon, job_id, user) as signals:
            with daemon.lock:
                daemon.store.submit(record, request, f"submitted by {user} (vmjob run, "
                                                     "no daemon)")
                why = scheduler.start_now_or_forget(daemon, job_id)
                placed = daemon.store.job(job_id)
            if why is not None or placed is None or placed.allocation is None:
                why = FIRST_IN_LINE.sub("", why or "it cannot start")
                raise DoesNotFit(f"cannot start now: {why} (without a daemon, vmjob run "
                                 "does not wait)")
            note(f"job {job_id} on {placed.host}: {describe_allocation(_allocation(placed))}")
            if signals:  # it came before the job existed: cancel it now
                daemon.ask_stop(job_id, JobState.CANCELLED,
                                f"cancelled by {user} ({signal.Signals(signals[0]).name})")
            _follow(daemon, job_id, write)
            view = _ended(daemon, job_id)
    finally:
        daemon.shutdown()
        for thread in threads:  # they end at once: stopping is set, a None note is queued
            thread.join(timeout=10)
        daemon.store.close()
        poke_daemon(config.socket)
    if signals and view["state"] == JobState.CANCELLED.value:
        note(cancelled_line(job_id, signals[0]))
        return interrupted_exit(signals[0])
    files = JobFiles.of(config.spool, job_id)
    if spec.output is not None and ended_with_output(view) and files.out.is_dir():
        shutil.copytree(files.out, spec.output, dirs_exist_ok=True)
    if (line := end_line(view)) is not None:
        note(line)
    return exit_code(view)


def _allocation(record: JobRecord) -> Allocation:
    assert record.allocation is not None
    return allocation_from_dict(record.allocation)


@contextmanager
def _cancel_on_signal(daemon: Daemon, job_id: str, user: str) -> Iterator[list[int]]:
    """Within: the first SIGINT or SIGTERM cancels the job (`Daemon.stop`, on the notes
    thread: a signal handler must not take the lock); the signals received are listed."""
    received: list[int] = []

    def cancel(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            daemon.ask_stop(job_id, JobState.CANCELLED,
                            f"cancelled by {user} ({signal.Signals(signum).name})")

    previous = {s: signal.signal(s, cancel) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _follow(daemon: Daemon, job_id: str, write: Callable[[str], None]) -> None:
    """Pass the job's output on until its end is recorded: the reader `vmjob logs -f` uses."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in logs.stream(daemon, job_id, follow=True):
        if text := decoder.decode(chunk):
            write(text)
    if tail := decoder.decode(b"", final=True):
        write(tail)


def _ended(daemon: Daemon, job_id: str) -> dict[str, Any]:
    """The job's end as the API would show it (`id state exit_code message`), once its cores
    are free. Raises VmjobsError when the store could not take its end (a full spool): the
    reservation is then freed by whoever next finds this process gone."""
    with daemon.lock:
        freed = daemon.changed.wait_for(
            lambda: job_id not in daemon.active or job_id in daemon.unrecorded, RELEASE_WAIT_S)
        host = daemon.active[job_id].host if job_id in daemon.active else None
    if not freed and host is not None:  # its QEMU never reported its end: make sure
        daemon.destroy_guest(host, job_id)
        with daemon.lock:
            daemon.changed.wait_for(lambda: job_id not in daemon.active, RELEASE_WAIT_S)
    with daemon.lock:
        pending = daemon.unrecorded.get(job_id)
        record = daemon.store.job(job_id)
    if pending is not None:
        daemon.destroy_guest(host or "", job_id)
        raise VmjobsError(
            f"job {job_id}: its end ({pending.verdict.reason}) could not be recorded in "
            f"{daemon.config.state_db} ({pending.error}); its guest is stopped and its "
            "reservation is freed by the next vmjob run or the daemon once there is room "
            "(this process, which held it, is gone)")
    assert record is not None
    return {"id": record.id, "state": record.state.value, "exit_code": record.exit_code,
            "message": record.message}


def poke_daemon(socket_path: Path) -> None:
    """Tell a daemon on this store (if one answers) that cores were freed behind its back.

    A daemon started while this direct run went on sees the run's reservation in the store
    and waits for it; nothing else would wake its scheduler when the run releases it.
    Best effort: no daemon, no harm.
    """
    if not socket_path.exists():
        return
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        with sock:
            sock.connect(str(socket_path))
            sock.sendall(b"POST /v1/wake HTTP/1.1\r\nHost: vmjobs\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            sock.recv(512)
    except OSError:
        pass
