"""A job's own output, read from its console log(s) in the spool, optionally followed live.

The console carries kernel and init messages too; `guest_protocol.ConsoleParser` keeps only
the job's lines, between the init's markers. A job that ran on several hosts (after a
migration or a restore) has one console file per stay on a host; they are stitched in the
order of the job's events. Following wakes on every change of the daemon's state and at least every
FOLLOW_TICK_S to read what the guest wrote meanwhile (a file offers no event of its own).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from vmjobs.daemon.core import Daemon
from vmjobs.guest import JobFiles, console_segments
from vmjobs.guest_protocol import ConsoleParser

FOLLOW_TICK_S = 0.1
CHUNK = 1 << 16


Segment = tuple[str, int]  # (host, visit): one stay of the job on a host


def _lines(parser: ConsoleParser, text: str) -> bytes:
    lines = parser.feed(text)
    return "".join(f"{line}\n" for line in lines).encode()


def stream(daemon: Daemon, job_id: str, follow: bool) -> Iterator[bytes]:
    files = JobFiles.of(daemon.config.spool, job_id)
    parser = ConsoleParser(job_id)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    done: list[Segment] = []  # segments whose console was read to its end
    current: Segment | None = None
    offset = 0
    while True:
        with daemon.lock:
            record = daemon.store.job(job_id)
            finished = record is None or record.state.finished
            hosts = console_segments(daemon.store.ran_on(job_id))
        if current is None:
            pending = [h for h in hosts if h not in done]
            current = pending[0] if pending else None
            offset = 0
        data = _read(files.console(*current), offset) if current else b""
        if data:
            offset += len(data)
            out = _lines(parser, decoder.decode(data))
            if out:
                yield out
            continue
        if current is not None and (current != hosts[-1] or finished):
            done.append(current)  # a later segment exists, or nothing more will come
            current = None
            if any(h not in done for h in hosts):
                continue
        if finished or not follow:
            break
        with daemon.lock:
            daemon.changed.wait(FOLLOW_TICK_S)
    tail = "".join(f"{line}\n" for line in parser.feed(decoder.decode(b"", final=True)))
    tail += "".join(f"{line}\n" for line in parser.finish())
    if tail:
        yield tail.encode()


def _read(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(CHUNK)
    except FileNotFoundError:
        return b""
