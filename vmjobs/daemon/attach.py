"""The console stream (`POST /v1/jobs/{id}/console`, docs/api.md): one connection that carries
a job's live output to the client and, for an interactive job, the client's input frames
(`vmjobs.console`) to its guest — what `vmjob shell`, `vmjob run -i` and `vmjob attach`
use through a daemon.

After the 101 answer the daemon sends the job's output bytes as they are (what `logs -f`
sends, without chunking) and closes the connection once the job has ended and its output is
all sent; the client then asks `wait` how it ended. The client sends input frames; every one
is checked (`console.FrameReader`: bounded, a malformed one ends the input side) before it goes
to the guest. A client that closes its connection leaves the job running (`attach` again).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import BinaryIO

from vmjobs.console import FrameError, FrameReader, encode
from vmjobs.daemon import logs
from vmjobs.daemon.core import Daemon

log = logging.getLogger("vmjobs.daemon")
PROTOCOL = "vmjob-console/1"
READ_BYTES = 1 << 16


def session(daemon: Daemon, job_id: str, with_input: bool,
            offset: int) -> Callable[[BinaryIO, socket.socket], None]:
    """What runs on the upgraded connection (`server.Upgrade.run`): output from byte `offset`
    until the job ends; input frames to the job when `with_input`."""

    def run(reader: BinaryIO, sock: socket.socket) -> None:
        done = threading.Event()
        if with_input:
            threading.Thread(target=_pump_input, args=(daemon, job_id, reader, sock, done),
                             name=f"console-in-{job_id}", daemon=True).start()
        try:
            for chunk in logs.stream(daemon, job_id, follow=True, offset=offset):
                sock.sendall(chunk)
        finally:
            done.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    return run


def _pump_input(daemon: Daemon, job_id: str, reader: BinaryIO, sock: socket.socket,
                done: threading.Event) -> None:
    frames = FrameReader()
    try:
        while not done.is_set():
            chunk = reader.read1(READ_BYTES)  # type: ignore[attr-defined]
            if not chunk:
                return  # the client closed its side: the job goes on
            if not daemon.send_input(job_id, [encode(f) for f in frames.feed(chunk)]):
                return  # the job ended (or takes no input)
    except FrameError as exc:
        log.warning("job %s: console input refused: %s", job_id, exc)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        return
