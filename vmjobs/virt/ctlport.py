"""The host end of a gang member's control port `org.vmjobs.ctl.0`, through libvirt.

The port is a `<channel type='unix'>` (domain_xml.unix_channel): libvirt picks the socket on
the host that runs the guest, and `virDomainOpenChannel` reaches it over the daemon's normal
connection to that host's libvirtd — the same way for this machine, a dev-cluster host and a
remote host, with no agent of ours there. After a migration the guest's port lives in the
destination's QEMU: the old stream ends, and the daemon opens the port again on the
destination (`ControlHub.attach`). Opened with VIR_DOMAIN_CHANNEL_FORCE, so a restarted
daemon takes the port over from a stream its dead predecessor left.

Reading is bounded: a line longer than `max_line` is cut there and the rest of it dropped
(the control service answers it with an error); nothing the guest sends grows memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import libvirt

from vmjobs.control import LineSplitter
from vmjobs.virt import Connection, VirtError
from vmjobs.virt.domain_xml import CONTROL_CHANNEL


class ControlPort:
    """One open control port: `on_line(bytes)` for each line the guest sends (from a reader
    thread), `on_closed()` once when the stream ends; `send(text)` writes one line."""

    def __init__(self, conn: Connection, domain_name: str, on_line: Callable[[bytes], None],
                 on_closed: Callable[[], None], max_line: int) -> None:
        dom = conn.lookupByName(domain_name)
        self.stream = conn.newStream(0)
        try:
            dom.openChannel(CONTROL_CHANNEL, self.stream, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
        except VirtError:
            with contextlib.suppress(VirtError):
                self.stream.abort()
            raise
        self.on_line, self.on_closed, self.max_line = on_line, on_closed, max_line
        self.send_lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._read, name=f"ctl-{domain_name}", daemon=True).start()

    def _read(self) -> None:
        lines = LineSplitter(self.max_line)
        try:
            while True:
                chunk = self.stream.recv(4096)
                if not isinstance(chunk, bytes) or not chunk:
                    break
                for line in lines.feed(chunk):
                    self.on_line(line)
        except VirtError:
            pass
        finally:
            self.closed = True
            self.on_closed()

    def send(self, line: str) -> bool:
        """Write `line` and a newline; False if the stream is gone."""
        data = (line + "\n").encode("ascii", errors="replace")
        try:
            with self.send_lock:
                while data:
                    sent = self.stream.send(data)
                    if sent < 0:
                        return False
                    data = data[sent:]
        except VirtError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(VirtError):
            self.stream.abort()
