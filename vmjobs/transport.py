"""How the client reaches the daemon's unix socket: directly, or through SSH on a head node.

`--url` / `$VMJOBS_URL` forms:

    unix:///run/vmjobs/vmjobs.sock     (or just the path)
    ssh://user@head[:port][/path/to/vmjobs.sock]

Through SSH the client opens one `direct-streamlocal@openssh.com` channel per HTTP connection
(what `ssh -L local:/remote.sock` uses), so the daemon sees the SSH user's uid from
SO_PEERCRED (`vmjobs.ssh`, imported only for an ssh:// URL: paramiko costs ~75 ms of CPU per
command, which a local `vmjob list` must not pay).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vmjobs.errors import UsageError, VmjobsError

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    socket: Path
    ssh_host: str | None = None
    ssh_user: str | None = None
    ssh_port: int = 22

    def describe(self) -> str:
        if self.ssh_host is None:
            return str(self.socket)
        user = f"{self.ssh_user}@" if self.ssh_user else ""
        return f"ssh://{user}{self.ssh_host}:{self.ssh_port}{self.socket}"


def parse_url(url: str, default_socket: Path) -> Target:
    if url.startswith("/"):
        return Target(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Target(Path(unquote(parts.path)) if parts.path else default_socket)
    if parts.scheme == "ssh":
        if not parts.hostname:
            raise UsageError(f"--url {url}: no host (ssh://user@head)")
        try:
            port = parts.port or 22
        except ValueError:
            raise UsageError(f"--url {url}: bad port") from None
        path = Path(unquote(parts.path)) if parts.path not in ("", "/") else default_socket
        return Target(path, parts.hostname, parts.username, port)
    raise UsageError(f"--url {url}: use unix:///path/to/vmjobs.sock or ssh://user@head")


def open_unix(path: Path, timeout: float | None = None) -> socket.socket:
    """A connection to the daemon's socket. A unix socket's connect does not wait when the
    listen queue is full but fails with EAGAIN (a busy daemon): try again for a while."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    give_up = time.monotonic() + (timeout or CONNECT_TIMEOUT_S)
    try:
        while True:
            try:
                sock.connect(str(path))
                return sock
            except BlockingIOError:
                if time.monotonic() > give_up:
                    raise VmjobsError(f"the daemon at {path} accepts no more connections "
                                      "(its queue is full); retry later") from None
                time.sleep(0.05)
    except BaseException:
        sock.close()
        raise
