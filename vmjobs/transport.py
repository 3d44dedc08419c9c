"""How the client reaches the daemon's unix socket: directly, or through SSH on a head node.

`--url` / `$VMJOBS_URL` forms:

    unix:///run/vmjobs/vmjobs.sock     (or just the path)
    ssh://user@head[:port][/path/to/vmjobs.sock]

Through SSH the client opens one `direct-streamlocal@openssh.com` channel per HTTP connection
(what `ssh -L local:/remote.sock` uses), so the daemon sees the SSH user's uid from
SO_PEERCRED. Host keys are checked against ~/.ssh/known_hosts (and the system's); an unknown
key is refused, never accepted silently.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

from vmjobs.errors import VmjobsError

STREAMLOCAL = "direct-streamlocal@openssh.com"
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
            raise VmjobsError(f"--url {url}: no host (ssh://user@head)")
        try:
            port = parts.port or 22
        except ValueError:
            raise VmjobsError(f"--url {url}: bad port") from None
        path = Path(unquote(parts.path)) if parts.path not in ("", "/") else default_socket
        return Target(path, parts.hostname, parts.username, port)
    raise VmjobsError(f"--url {url}: use unix:///path/to/vmjobs.sock or ssh://user@head")


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


class _StreamlocalTransport(paramiko.Transport):
    """paramiko opens direct-tcpip channels but not direct-streamlocal ones: the only
    difference is the channel-open message's payload, which this adds on the way out."""

    _path: str | None = None
    _open_lock = threading.Lock()

    def open_unix_channel(self, path: str, timeout: float | None = None) -> paramiko.Channel:
        with self._open_lock:
            self._path = path
            try:
                return self.open_channel(STREAMLOCAL, timeout=timeout)
            finally:
                self._path = None

    def _send_user_message(self, data: Message) -> None:  # paramiko internal, see class doc
        if self._path is not None and isinstance(data, Message):
            raw = data.asbytes()
            if raw[:1] == cMSG_CHANNEL_OPEN and STREAMLOCAL.encode() in raw[:64]:
                data.add_string(self._path)  # socket path
                data.add_string("")  # reserved
                data.add_int(0)  # reserved
        super()._send_user_message(data)


class SshTunnel:
    """One SSH connection to the head node; a fresh channel to the socket per request."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.client = paramiko.SSHClient()
        self.client.load_system_host_keys()
        known = Path(os.path.expanduser("~/.ssh/known_hosts"))
        if known.exists():
            self.client.load_host_keys(str(known))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self.client.connect(
                target.ssh_host or "", port=target.ssh_port, username=target.ssh_user,
                timeout=CONNECT_TIMEOUT_S, transport_factory=_StreamlocalTransport,
            )
        except paramiko.SSHException as exc:
            raise VmjobsError(f"ssh to {target.describe()}: {exc}") from None
        except OSError as exc:
            raise VmjobsError(f"ssh to {target.describe()}: {exc.strerror or exc}") from None

    def open(self) -> paramiko.Channel:
        transport = self.client.get_transport()
        assert isinstance(transport, _StreamlocalTransport)
        try:
            return transport.open_unix_channel(str(self.target.socket), CONNECT_TIMEOUT_S)
        except paramiko.ChannelException as exc:
            raise VmjobsError(
                f"{self.target.describe()}: the head node refused a connection to the socket "
                f"({exc.text}); is the daemon running there, and streamlocal forwarding "
                "allowed (sshd AllowStreamLocalForwarding)?"
            ) from None

    def close(self) -> None:
        self.client.close()
