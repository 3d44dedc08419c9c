"""The SSH leg of `--url ssh://user@head`: one SSH connection to the head node, one
`direct-streamlocal@openssh.com` channel to the daemon's socket per HTTP connection (what
`ssh -L local:/remote.sock` uses), so the daemon sees the SSH user's uid from SO_PEERCRED.

Host keys are checked against ~/.ssh/known_hosts (and the system's); an unknown key is refused,
never accepted silently. Imported only when a URL is ssh:// (`Client.open_socket`).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

from vmjobs.errors import VmjobsError
from vmjobs.transport import CONNECT_TIMEOUT_S, Target

STREAMLOCAL = "direct-streamlocal@openssh.com"


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


class _ChannelReader(io.RawIOBase):
    """A channel's incoming bytes as a raw stream (each read returns what has arrived)."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._channel.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class ChannelSocket:
    """A channel as `http.client` uses a socket. paramiko's own `makefile` (ChannelFile) has
    no `peek` or `read1`, which `http.client` needs to read a chunked answer line by line or
    as it arrives (a reservation's NDJSON stream, `logs -f`); a BufferedReader over the
    channel has both. Everything else is the channel's."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def makefile(self, mode: str = "rb", *_args: Any, **_kwargs: Any) -> io.BufferedReader:
        assert "r" in mode and "b" in mode, mode
        return io.BufferedReader(_ChannelReader(self._channel))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


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

    def open(self) -> ChannelSocket:
        transport = self.client.get_transport()
        assert isinstance(transport, _StreamlocalTransport)
        try:
            return ChannelSocket(transport.open_unix_channel(str(self.target.socket),
                                                             CONNECT_TIMEOUT_S))
        except paramiko.ChannelException as exc:
            raise VmjobsError(
                f"{self.target.describe()}: the head node refused a connection to the socket "
                f"({exc.text}); is the daemon running there, and streamlocal forwarding "
                "allowed (sshd AllowStreamLocalForwarding)?"
            ) from None

    def close(self) -> None:
        self.client.close()
