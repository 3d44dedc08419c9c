"""An interactive job's input, on its way to the guest: one `InputFeed` per job that has had
input, holding the frames (`vmjobs.console`) its clients sent, written in order to the
guest's input port (`virt.console.InputPort`) by a thread of its own.

The feed waits while the job's guest is not running yet (frames typed during the boot are
kept), opens the port when it is, and opens it again after the guest moved (a migration or a
restore breaks the stream). Bounded: at most MAX_QUEUED frames wait (each at most
`console.MAX_DATA` bytes); a client that sends more waits in `put` — the guest's own flow
control reaches back to the client's socket and terminal. Frames still queued when the job
ends are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from vmjobs.errors import VmjobsError
from vmjobs.virt.console import InputPort, InputPortError

log = logging.getLogger("vmjobs.daemon")
MAX_QUEUED = 64
RETRY_S = 0.2  # between attempts to open the port of a guest that runs but did not take it
# where the job's guest runs now, waiting while it does not: (open the port, or None when the
# job is over); given by the core
Where = Callable[[], Callable[[], InputPort] | None]


class InputFeed:
    """The frames for one job's input port, written by one thread."""

    def __init__(self, job_id: str, where: Where) -> None:
        self.job_id = job_id
        self._where = where
        self._frames: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED)
        self._closed = threading.Event()
        threading.Thread(target=self._run, name=f"stdin-{job_id}", daemon=True).start()

    def put(self, frame: bytes) -> bool:
        """Queue one encoded frame, waiting while MAX_QUEUED are queued; False once the feed
        is closed (the job ended)."""
        while not self._closed.is_set():
            try:
                self._frames.put(frame, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """The job ended: drop what is queued, end the thread."""
        self._closed.set()
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._frames.put_nowait(None)

    def _run(self) -> None:
        port: InputPort | None = None
        try:
            while not self._closed.is_set():
                frame = self._frames.get()
                if frame is None:
                    return
                while not self._closed.is_set():
                    if port is None:
                        port = self._open()
                        if port is None:
                            return
                    try:
                        port.send(frame)
                        break
                    except InputPortError as exc:  # the guest stopped or moved
                        log.info("job %s: input port: %s", self.job_id, exc)
                        port.close()
                        port = None
        finally:
            if port is not None:
                port.close()

    def _open(self) -> InputPort | None:
        while not self._closed.is_set():
            opener = self._where()
            if opener is None:
                return None
            try:
                return opener()
            except (InputPortError, VmjobsError) as exc:
                log.debug("job %s: input port not open yet: %s", self.job_id, exc)
                time.sleep(RETRY_S)
        return None
