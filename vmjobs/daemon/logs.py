"""A job's own output (its stdout and stderr), read from the spool, optionally followed live.

The guest sends the job's output to its own virtio port, which QEMU writes straight to
`<job>/output.<n>.out` (see `domain_xml.output_channel`): the files hold the output whole,
whatever its size, and whether or not a daemon was watching. A job that moved (migration,
restore) has one file per guest process; `guest.OutputReader` reads them in order. The bytes
are passed on as they are; the client decodes them. A follower sleeps until the files change
(inotify, `outputwatch.OutputWatch`) or the daemon's state does (`Daemon.wake` wakes every
follower), with FOLLOW_SAFETY_S as a safety net only.
"""

from __future__ import annotations

from collections.abc import Iterator

from vmjobs.daemon.core import Daemon
from vmjobs.guest import JobFiles, OutputReader
from vmjobs.outputwatch import OutputWatch

FOLLOW_SAFETY_S = 5.0
CHUNK = 1 << 16


def stream(daemon: Daemon, job_id: str, follow: bool, offset: int = 0) -> Iterator[bytes]:
    """The job's output bytes from byte `offset` on; with `follow`, until the job ends."""
    files = JobFiles.of(daemon.config.spool, job_id)
    reader = OutputReader(files)
    reader.skip(offset)
    watch = OutputWatch(files.dir) if follow else None
    if watch is not None:
        with daemon.lock:
            daemon.followers.add(watch)
    try:
        while True:
            with daemon.lock:
                record = daemon.store.job(job_id)
                # A job's end is recorded after its guest wrote its last byte (the init
                # powers the guest off after the job's processes are gone).
                finished = record is None or record.state.finished
            data = reader.read(final=finished, limit=CHUNK)
            if data:
                yield data
                continue
            if finished or watch is None:
                return
            watch.wait(FOLLOW_SAFETY_S)
    finally:
        if watch is not None:
            with daemon.lock:  # Daemon.wake writes to it under the lock: never after close
                daemon.followers.discard(watch)
            watch.close()
