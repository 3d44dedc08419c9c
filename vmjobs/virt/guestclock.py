"""Setting a guest's wall clock from the host, through libvirt, after a migration or restore.

A restored guest's clock resumes from the moment it was saved (and TCG guests drift during a
migration's downtime). The guest init listens on the virtio port `org.vmjobs.clock.0`
(`domain_xml.clock_channel`); this module reaches it with `virDomainOpenChannel`, so it works
over any libvirt connection, remote hosts included, with no agent of ours on the host.

Protocol (one line each way, see images/init): `ping` -> `pong`, then
`settime SEC NSEC` -> `ok BEFORE AFTER` (the guest's whole seconds before and after).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt

from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection
from vmjobs.virt.domain_xml import CLOCK_CHANNEL


class ClockError(VmjobsError):
    pass


@dataclass(frozen=True)
class ClockSet:
    before: int  # the guest's clock (s since the epoch) before it was set
    after: int  # and after
    host: float  # the host's clock when the guest answered

    @property
    def correction_s(self) -> float:
        return self.host - self.before

    @property
    def error_s(self) -> float:
        return self.after - self.host


class _Lines:
    """Lines from a blocking stream, read by a thread so that waits can time out."""

    def __init__(self, stream: libvirt.virStream) -> None:
        self.stream = stream
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="guestclock", daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self.stream.recv(256)
                if not isinstance(chunk, bytes) or not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self.lines.put(line.decode(errors="replace").strip())
        except libvirt.libvirtError:
            pass
        self.lines.put(None)

    def send(self, data: bytes) -> None:
        while data:
            data = data[self.stream.send(data):]

    def read(self, until: float) -> str:
        try:
            line = self.lines.get(timeout=max(until - time.monotonic(), 0.001))
        except queue.Empty:
            raise ClockError("the guest did not answer on its clock port") from None
        if line is None:
            raise ClockError("the guest's clock port closed")
        return line


@contextlib.contextmanager
def _port(conn: Connection, name: str, deadline: float) -> Iterator[_Lines]:
    """The guest's port, once its init answers a `ping`; ClockError if it cannot be had."""
    try:
        dom = conn.lookupByName(name)
        stream = conn.newStream(0)
    except libvirt.libvirtError as exc:
        raise ClockError(exc.get_error_message()) from None
    try:
        try:
            dom.openChannel(CLOCK_CHANNEL, stream, 0)
        except libvirt.libvirtError as exc:
            raise ClockError(f"no clock port: {exc.get_error_message()}") from None
        lines = _Lines(stream)
        # The guest re-opens its port every 200 ms while nobody is connected: ping until it
        # answers, so that what is sent next is read at once.
        while True:
            lines.send(b"ping\n")
            try:
                if lines.read(min(deadline, time.monotonic() + 0.5)) == "pong":
                    break
            except ClockError:
                if time.monotonic() > deadline:
                    raise
        yield lines
    except libvirt.libvirtError as exc:
        raise ClockError(exc.get_error_message()) from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()


def set_clock(conn: Connection, name: str, timeout_s: float = 10.0) -> ClockSet:
    """Tell the guest `name` on `conn` the host's time; raise ClockError if it cannot."""
    deadline = time.monotonic() + timeout_s
    with _port(conn, name, deadline) as lines:
        now = time.time_ns()
        lines.send(f"settime {now // 1_000_000_000} {now % 1_000_000_000}\n".encode())
        while True:
            answer = lines.read(deadline).split()
            if answer and answer[0] == "ok" and len(answer) == 3:
                try:
                    return ClockSet(int(answer[1]), int(answer[2]), time.time())
                except ValueError:  # the guest's words are untrusted
                    raise ClockError(f"the guest answered {' '.join(answer)[:40]!r}") from None


def ask(conn: Connection, name: str, line: str, timeout_s: float = 10.0) -> str:
    """Send one command line to the guest init's port and return its answer (the first line
    that is not a late `pong`; untrusted: at most 256 characters). ClockError if none."""
    deadline = time.monotonic() + timeout_s
    with _port(conn, name, deadline) as lines:
        lines.send(line.encode() + b"\n")
        while True:
            answer = lines.read(deadline)
            if answer != "pong":
                return answer[:256]


def sync_quietly(conn: Connection, name: str) -> str:
    """`set_clock`, summarised in a few words for the job's timeline; never raises."""
    try:
        done = set_clock(conn, name)
    except ClockError as exc:
        return f"not set ({exc})"
    return f"set (was {done.correction_s:+.0f}s off)"
