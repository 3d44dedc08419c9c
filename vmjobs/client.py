"""The daemon's client: HTTP/1.1 + JSON over the unix socket (or SSH), one call per endpoint.

Errors come back as one line: the daemon's own `error` text, or how to reach/start a daemon.

Kept light to import: every `vmjob` command that talks to the daemon loads it, so SSH
(`vmjobs.ssh`, paramiko) and the tar machinery of uploads and outputs are imported by the calls
that need them, not here.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from vmjobs.errors import UsageError, VmjobsError
from vmjobs.holdkey import BAD_KEY, EXIT_BAD_KEY
from vmjobs.transport import Target, open_unix, parse_url

if TYPE_CHECKING:
    from vmjobs.ssh import SshTunnel

START_HINT = ("start one with 'vmjob serve' as root (see docs/operations.md), "
              "or point --url / $VMJOBS_URL at one")


RECONNECT_S = 60.0  # how long wait/logs keep trying to reach a daemon that went away
RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0)  # between attempts; the last one repeats


def segment(value: str, what: str = "job id") -> str:
    """`value` quoted as one segment of an API path. An empty one is a usage error: the path
    would name something else (`/v1/jobs/` is the job list), and the answer — "no such
    endpoint" — would not say what was wrong."""
    if not value.strip():
        raise UsageError(f"give a {what} (an empty string names none)")
    return quote(value, safe="")

class DaemonLost(VmjobsError):
    """The daemon did not answer or the connection broke mid-answer (a restart looks so)."""

    json_code = "daemon_lost"


class NoDaemon(DaemonLost):
    """Nothing listens on the socket."""

    json_code = "no_daemon"


class Reconnect:
    """Bounded retries of idempotent requests after the daemon went away: a line when the
    connection is lost, a line when it is back, an error once RECONNECT_S have passed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.since: float | None = None
        self.attempt = 0

    def lost(self, exc: DaemonLost) -> None:
        """Wait before the next attempt, or raise if retrying makes no sense (the daemon never
        accepted this client: there is none to wait for, so say how to start one) or the
        time is up."""
        if not self.client.reached:
            raise exc
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self.client.note(f"{exc}; reconnecting (for up to {RECONNECT_S:g}s)")
        elif now - self.since >= RECONNECT_S:
            raise DaemonLost(f"{exc}; gave up reconnecting after {RECONNECT_S:g}s") from None
        time.sleep(RECONNECT_DELAYS_S[min(self.attempt, len(RECONNECT_DELAYS_S) - 1)])
        self.attempt += 1

    def ok(self) -> None:
        if self.since is not None:
            self.client.note(f"reconnected to the daemon after "
                             f"{time.monotonic() - self.since:.1f}s")
        self.since, self.attempt = None, 0


def _stderr(message: str) -> None:
    print(f"vmjob: {message}", file=sys.stderr, flush=True)


# the daemon's error codes that are the user's input to fix: exit 2, as for a bad option
USAGE_CODES = frozenset({"usage", "ambiguous"})
# codes with an exit code of their own: a wrong or missing reservation key (vmjobs.holdkey)
EXIT_CODES = {BAD_KEY: EXIT_BAD_KEY}


class ApiFailure(VmjobsError):
    """The daemon answered with an error (exit 2 for a usage error, else 1)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.exit_code = 2 if code in USAGE_CODES else EXIT_CODES.get(code or "", 1)


class _Connection(http.client.HTTPConnection):
    def __init__(self, client: Client, timeout: float | None) -> None:
        super().__init__("vmjobs", timeout=timeout)
        self._client = client

    def connect(self) -> None:
        self.sock = self._client.open_socket(self.timeout)


class Client:
    def __init__(self, target: Target, note: Callable[[str], None] = _stderr) -> None:
        self.target = target
        self.note = note  # one-line messages about the connection (reconnecting ...)
        self.reached = False  # a daemon accepted this client's connection once
        self._tunnel: SshTunnel | None = None

    @classmethod
    def from_url(cls, url: str | None, default_socket: Path) -> Client:
        url = url or os.environ.get("VMJOBS_URL")
        return cls(parse_url(url, default_socket) if url else Target(default_socket))

    def close(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()

    def open_socket(self, timeout: float | None) -> Any:
        if self.target.ssh_host is not None:
            if self._tunnel is None:
                from vmjobs.ssh import SshTunnel  # paramiko: only for ssh:// URLs

                self._tunnel = SshTunnel(self.target)
            channel = self._tunnel.open()
            self.reached = True
            return channel
        path = self.target.socket
        try:
            sock = open_unix(path, timeout if isinstance(timeout, float | int) else None)
            self.reached = True
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no vmjob daemon at {path}: {START_HINT}") from None
        except PermissionError:
            raise VmjobsError(f"no permission to connect to {path} (the daemon makes it "
                              "world-writable; is this an old or foreign socket?)") from None

    # --- plumbing -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: bytes | Any | None = None,
              content_type: str = "application/json", length: int | None = None,
              timeout: float | None = None) -> http.client.HTTPResponse:
        conn = _Connection(self, timeout)
        headers = {"Content-Type": content_type}
        if body is not None:
            headers["Content-Length"] = str(length if length is not None else len(body))
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The daemon may refuse (403, 413 ...) before reading the whole body and
                # close; its answer is then waiting to be read: that is what to show.
                try:
                    response = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    raise exc from None
            else:
                response = conn.getresponse()
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            conn.close()
            raise self._lost(exc) from None
        if response.status >= 400:
            raise _failure(response)
        return response

    def _lost(self, exc: BaseException) -> DaemonLost:
        why = str(exc) or type(exc).__name__
        return DaemonLost(f"lost the daemon at {self.target.describe()}: {why}")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        response = self._send(method, path, data, timeout=timeout)
        try:
            return json.loads(response.read())
        except (ConnectionError, http.client.HTTPException) as exc:
            raise self._lost(exc) from None
        finally:
            response.close()

    # --- endpoints ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")

    def hosts(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/hosts")

    def usage(self, by: str, since_s: float) -> dict[str, Any]:
        return self.call("GET", f"/v1/usage?by={quote(by, safe='')}&since={since_s:.0f}")

    def profiles(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/profiles")

    def pools(self, name: str | None = None) -> Any:
        """GET /v1/pools (a list), or /v1/pools/NAME (one pool)."""
        return self.call("GET", "/v1/pools" + (f"/{quote(name, safe='')}" if name else ""))

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/v1/jobs", spec)

    def jobs(self, include_finished: bool = False) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/jobs" + ("?all=1" if include_finished else ""))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{segment(job_id)}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/jobs/{segment(job_id)}/cancel")

    def cancel_many(self, query: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/cancel: {"jobs": [...], "states": [...], "user": NAME} -> what ended."""
        return self.call("POST", "/v1/cancel", query)

    def wait(self, job_id: str, poll_s: float = 300.0,
             timeout: float | None = None) -> dict[str, Any]:
        """Until the job ends, or `timeout` seconds have passed (then the view answered last,
        its `finished` false): long polls of at most `poll_s` each (the daemon answers at the
        end). A daemon that goes away meanwhile (a restart) is waited for (`Reconnect`)."""
        retry = Reconnect(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = poll_s if deadline is None else max(0.0, min(poll_s,
                                                                deadline - time.monotonic()))
            query = urlencode({"timeout": round(left, 3)})
            try:
                view = self.call("GET", f"/v1/jobs/{segment(job_id)}/wait?{query}")
            except DaemonLost as exc:
                retry.lost(exc)
                continue
            retry.ok()
            if view.get("finished") or (deadline is not None
                                        and time.monotonic() >= deadline):
                return view
            job_id = view["id"]  # a prefix resolved once: a later job cannot make it ambiguous

    def tail(self, job_id: str, lines: int) -> tuple[str, int]:
        """The last `lines` lines of the job's output so far (a last line without its newline
        counts), and the output's length so far in bytes (where a follow goes on from).
        Memory: the kept lines and one chunk, whatever the output's size."""
        kept: collections.deque[bytes] = collections.deque(maxlen=max(lines, 0) or 1)
        partial, total = b"", 0
        response = self._send("GET", f"/v1/jobs/{segment(job_id)}/logs")
        try:
            while chunk := response.read1(1 << 16):
                total += len(chunk)
                *complete, partial = (partial + chunk).split(b"\n")
                kept.extend(line + b"\n" for line in complete[-kept.maxlen:])
        except (ConnectionError, http.client.HTTPException) as exc:
            raise self._lost(exc) from None
        finally:
            response.close()
        if partial:
            kept.append(partial)
        text = b"".join(kept).decode("utf-8", errors="replace") if lines > 0 else ""
        return text, total

    def logs(self, job_id: str, follow: bool = False, offset: int = 0) -> Iterator[str]:
        """The job's output from byte `offset` on, as it arrives (text chunks; a character
        split between two reads is decoded whole). After a daemon restart it reconnects
        (`Reconnect`) and goes on from the byte it had reached."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        retry = Reconnect(self)
        received = offset
        while True:
            query = {"follow": 1} if follow else {}
            if received:
                query["offset"] = received
            path = f"/v1/jobs/{segment(job_id)}/logs" + \
                (f"?{urlencode(query)}" if query else "")
            try:
                response = self._send("GET", path)
                retry.ok()
                try:
                    while chunk := response.read1(1 << 16):
                        received += len(chunk)
                        if text := decoder.decode(chunk):
                            yield text
                except (ConnectionError, http.client.HTTPException) as exc:
                    raise self._lost(exc) from None
                finally:
                    response.close()
            except DaemonLost as exc:
                retry.lost(exc)
                continue
            break
        if tail := decoder.decode(b"", final=True):
            yield tail

    def progress(self, path: str, body: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """A long operation (migrate, checkpoint, drain ...): what it reports as it goes, one
        object at a time; the last one holds `results` or `error`."""
        response = self._send("POST", path, json.dumps(body or {}).encode())
        try:
            for raw in response:
                if raw.strip():
                    yield json.loads(raw)
        except (ConnectionError, http.client.HTTPException) as exc:
            raise VmjobsError(f"lost the daemon at {self.target.describe()}: {exc}") from None
        finally:
            response.close()

    def reserve(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /v1/reservations: the reservation's view at each change, until it is held
        (with a duration) or has ended; a reservation without a duration is held while this
        connection stays open (blank heartbeat lines are skipped)."""
        response = self._send("POST", "/v1/reservations", json.dumps(body).encode())
        try:
            for raw in response:
                if raw.strip():
                    yield json.loads(raw)
        except (ConnectionError, http.client.HTTPException) as exc:
            raise self._lost(exc) from None
        finally:
            response.close()

    def release(self, reservation_id: str, key: str | None = None,
                force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"force": force}
        if key is not None:
            body["key"] = key
        path = f"/v1/reservations/{segment(reservation_id, 'reservation id')}/release"
        return self.call("POST", path, body)

    def job_action(self, job_id: str, action: str,
                   body: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        return self.progress(f"/v1/jobs/{segment(job_id)}/{action}", body)

    def host_action(self, host: str, action: str,
                    body: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        return self.progress(f"/v1/hosts/{segment(host, 'host name')}/{action}", body)

    def upload_dir(self, directory: Path) -> str:
        """Pack `directory` (with the caller's own permissions) and upload it; a token."""
        import tarfile
        import tempfile

        if not directory.is_dir():
            raise VmjobsError(f"--input {directory}: not a directory")
        with tempfile.TemporaryFile() as spool:
            try:
                with tarfile.open(fileobj=spool, mode="w:") as tar:
                    tar.add(directory, arcname=".")
            except OSError as exc:
                raise VmjobsError(f"--input {directory}: {exc}") from None
            length = spool.tell()
            spool.seek(0)
            response = self._send("POST", "/v1/uploads", spool, "application/x-tar", length)
            try:
                return str(json.loads(response.read())["upload"])
            finally:
                response.close()

    def console(self, job_id: str, with_input: bool, from_end: bool = False) -> ConsoleLink:
        """The job's console stream (`POST /v1/jobs/{id}/console`, upgraded to a two-way
        byte stream): its live output, and the caller's input frames when `with_input`.
        Raises ApiFailure as other calls do (409: the job ended, or takes no input)."""
        query = urlencode({"input": int(with_input), "from": "end" if from_end else "start"})
        sock = self.open_socket(None)
        try:
            sock.sendall(
                f"POST /v1/jobs/{segment(job_id)}/console?{query} HTTP/1.1\r\n"
                "Host: vmjobs\r\nConnection: Upgrade\r\nUpgrade: vmjob-console/1\r\n"
                "Content-Length: 0\r\n\r\n".encode())
            head, rest = _read_head(sock)
            status, headers = _parse_head(head)
            if status != 101:
                body = rest
                length = int(headers.get("content-length", "0") or 0)
                while len(body) < min(length, 1 << 16):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    body += chunk
                raise _failure_of(status, body)
        except (OSError, ValueError) as exc:
            sock.close()
            raise self._lost(exc) from None
        except BaseException:
            sock.close()
            raise
        return ConsoleLink(sock, rest)

    def fetch_output(self, job_id: str, dest: Path) -> None:
        """Unpack the job's /job/out into `dest` (the daemon already checked it; the `data`
        filter refuses anything odd all the same)."""
        import shutil
        import tarfile
        import tempfile

        from vmjobs.safetar import extract_data

        response = self._send("GET", f"/v1/jobs/{segment(job_id)}/output")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile() as spool:
                shutil.copyfileobj(response, spool)
                spool.seek(0)
                with tarfile.open(fileobj=spool, mode="r:") as tar:
                    extract_data(tar, dest)
        except (OSError, tarfile.TarError) as exc:
            raise VmjobsError(f"--output {dest}: {exc}") from None
        finally:
            response.close()


class ConsoleLink:
    """One console stream: `output()` yields the job's output bytes until the daemon closes
    the stream (the job ended); `send(frames)` sends input frames (thread-safe); `close()`
    ends it from this side (the job goes on)."""

    def __init__(self, sock: Any, early: bytes) -> None:
        self._sock = sock
        self._early = early  # output that came with the answer's head
        self._lock = threading.Lock()

    def send(self, frames: list[bytes]) -> bool:
        try:
            with self._lock:
                self._sock.sendall(b"".join(frames))
            return True
        except OSError:
            return False

    def output(self) -> Iterator[bytes]:
        if self._early:
            yield self._early
            self._early = b""
        while True:
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        import socket

        with contextlib.suppress(OSError, AttributeError, TypeError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


MAX_HEAD = 16 << 10


def _read_head(sock: Any) -> tuple[bytes, bytes]:
    """An HTTP answer's status line and headers, and what came after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise ValueError("the daemon's answer has an oversized head")
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _failure_of(status: int, raw: bytes) -> ApiFailure:
    try:
        body = json.loads(raw)
        return ApiFailure(status, str(body["error"]), body.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiFailure(status, f"daemon answered {status}", None)


def _failure(response: http.client.HTTPResponse) -> ApiFailure:
    raw = response.read()
    response.close()
    try:
        body = json.loads(raw)
        message, code = str(body["error"]), body.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = f"daemon answered {response.status} {response.reason}", None
    return ApiFailure(response.status, message, code)
