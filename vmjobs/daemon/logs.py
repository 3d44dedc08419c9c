"""A job's own output (its stdout and stderr), read from the spool, optionally followed live.

The guest sends the job's output to its own virtio port, which QEMU writes straight to
`<job>/output.<n>.out` (see `domain_xml.output_channel`): the files hold the output whole,
whatever its size, and whether or not a daemon was watching. A job that moved (migration,
restore) has one file per guest process; `guest.OutputReader` reads them in order. The bytes
are passed on as they are; the client decodes them. Following wakes on every change of the
daemon's state and at least every FOLLOW_TICK_S to read what the guest wrote meanwhile (a file
offers no event of its own).
"""

from __future__ import annotations

from collections.abc import Iterator

from vmjobs.daemon.core import Daemon
from vmjobs.guest import JobFiles, OutputReader

FOLLOW_TICK_S = 0.1
CHUNK = 1 << 16


def stream(daemon: Daemon, job_id: str, follow: bool, offset: int = 0) -> Iterator[bytes]:
    """The job's output bytes from byte `offset` on; with `follow`, until the job ends."""
    reader = OutputReader(JobFiles.of(daemon.config.spool, job_id))
    reader.skip(offset)
    while True:
        with daemon.lock:
            record = daemon.store.job(job_id)
            # A job's end is recorded after its guest wrote its last byte (the init powers
            # the guest off after the job's processes are gone); an end the store could not
            # take yet (a full spool) comes after it too.
            finished = record is None or record.state.finished or job_id in daemon.unrecorded
        data = reader.read(final=finished, limit=CHUNK)
        if data:
            yield data
            continue
        if finished or not follow:
            return
        with daemon.lock:
            daemon.changed.wait(FOLLOW_TICK_S)
