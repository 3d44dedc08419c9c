"""HTTP/1.1 + JSON over a unix socket, with the caller's identity from SO_PEERCRED.

Standard tools speak it (`curl --unix-socket /run/vmjobs/vmjobs.sock http://vmjobs/v1/jobs`).
One thread per connection (`ThreadingMixIn`): a `wait` or `logs -f` blocks only its own thread.
Handlers get an `ApiRequest` and return a `Json` or a `Stream`; an `ApiError` becomes a JSON
error body with one line meant for the user — as does every error the HTTP layer itself finds
(400, 408, 411, 413, 414, 431, 501, 505).

A root daemon serving many users must not be stalled by one of them, so connections are
bounded (`Limits`): per uid and in total, with a reserve only root and the admin group may use,
refused at accept with a JSON 429/503 before any thread is started. A request must arrive in
time: its request line and headers within `request_timeout_s` (one deadline for all of them,
so a client dripping a byte a second gains nothing), its body within that plus
`length / min_body_rate`. One watchdog thread holds the deadlines and, when one passes, shuts
the connection's reading side; the blocked read returns and the handler answers 408. The
stdlib's server stays because it can do all of this in a few lines; what it lacked was the
accounting and the deadlines, not a parser.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import socket
import socketserver
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from vmjobs.daemon.identity import Caller, caller, peer_uid, user_name
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError

log = logging.getLogger("vmjobs.daemon")
MAX_JSON_BODY = 4 << 20
MAX_QUERY_FIELDS = 32
# what is read and thrown away of a body the handler refused unread, so that the client's
# send completes and it reads the answer instead of a broken pipe (a "lingering close")
MAX_DRAIN = MAX_JSON_BODY + (64 << 10)
# a stream write blocked this long (a client that stopped reading) gives the connection up
SEND_TIMEOUT_S = 300.0
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


@dataclass(frozen=True)
class Limits:
    """How many connections the daemon holds at once, and how long a request may take.

    `total` bounds the connections of ordinary users together and `per_user` those of one
    uid; root and the admin group may use `total` and, beyond it, `admin_reserve` more, so
    users filling every slot never lock an admin out. Every connection is one thread and one
    file descriptor: `fit_to_fds` keeps the sum under the daemon's open-files limit.
    """

    total: int = 512
    per_user: int = 64
    admin_reserve: int = 32
    request_timeout_s: float = 10.0  # request line + headers, from when the daemon waits
    min_body_rate: int = 64 << 10  # bytes/s: a body of n bytes gets timeout + n / rate

    def fit_to_fds(self, nofile: int) -> Limits:
        """Shrink `total` so that connections leave room (libvirt, the store, logs) under an
        open-files limit of `nofile`."""
        budget = nofile - max(64, nofile // 8) - self.admin_reserve
        if self.total <= budget:
            return self
        total = max(1, budget)
        return Limits(total, min(self.per_user, total), self.admin_reserve,
                      self.request_timeout_s, self.min_body_rate)

    def body_deadline_s(self, length: int) -> float:
        return self.request_timeout_s + length / self.min_body_rate


class ApiError(Exception):
    """`code` names the failure for programs (e.g. "not_started" for --no-wait)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class ApiRequest:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]  # from the route pattern
    caller: Caller
    length: int | None
    body: BinaryIO | _Body
    upgrade: str | None = None  # the Upgrade header: the protocol asked for (`Upgrade`)

    def json(self) -> dict[str, Any]:
        if self.length is None or self.length == 0:
            return {}
        if self.length > MAX_JSON_BODY:
            raise ApiError(413, f"request body over {MAX_JSON_BODY >> 20} MiB")
        raw = self.body.read(self.length)
        if len(raw) < self.length:
            raise ApiError(400, f"request body ended after {len(raw)} of {self.length} bytes")
        try:
            data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def flag(self, name: str) -> bool:
        value = self.query.get(name, "").lower()
        if value not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ApiError(400, f"query parameter {name}={value!r} must be 1/0, true/false "
                                "or yes/no")
        return value in ("1", "true", "yes")

    def number(self, name: str, low: float, high: float) -> float | None:
        """A plain decimal in [low, high] (no sign, exponent, nan or inf), or None if absent.
        Raises ApiError 400 otherwise."""
        value = self.query.get(name)
        if value is None or value == "":
            return None
        if not _NUMBER.fullmatch(value) or not low <= float(value) <= high:
            raise ApiError(400, f"query parameter {name}={value!r} must be a number from "
                                f"{low:g} to {high:g}")
        return float(value)


def _not_json(word: str) -> Any:
    raise ValueError(f"{word} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the range of a number")
    return value


@dataclass
class Json:
    body: Any
    status: int = 200


@dataclass
class Stream:
    chunks: Iterator[bytes]
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Upgrade:
    """Switch the connection to a two-way byte stream (101 Switching Protocols, as a
    WebSocket or Docker's attach does): `run(reader, sock)` then owns it — `reader` holds
    what the client sends from now on (buffered), `sock` is for sending and `shutdown`. The
    request must carry `Upgrade: <protocol>`. The connection has no send or read timeout
    from then on (an interactive session may be idle for hours); it is closed after `run`."""

    protocol: str
    run: Callable[[BinaryIO, socket.socket], None]


Handler = Callable[[ApiRequest], Json | Stream | Upgrade]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        # "/v1/jobs/{id}" -> named groups; ids and names never contain "/"
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self.routes.append((method, re.compile(f"^{regex}$"), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = []
        for route_method, regex, handler in self.routes:
            match = regex.match(path)
            if match:
                if route_method == method:
                    return handler, match.groupdict()
                allowed.append(route_method)
        if allowed:
            raise ApiError(405, f"{method} not allowed on {path} (use {', '.join(allowed)})")
        raise ApiError(404, f"no such endpoint: {path} (see docs/api.md)")


def _status_of(exc: VmjobsError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, DoesNotFit):
        return 409
    return 400


def content_length(values: list[str]) -> int | None:
    """The body's length from every Content-Length header sent (None: no body).
    Raises ApiError 400 for anything but one plain whole number."""
    if not values:
        return None
    texts = {v.strip() for v in values}
    if len(texts) > 1:
        raise ApiError(400, "conflicting Content-Length headers")
    text = texts.pop()
    if not _CONTENT_LENGTH.fullmatch(text):
        raise ApiError(400, f"Content-Length {text[:40]!r} is not a whole number of bytes")
    return int(text)


def error_response(status: int, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, as bytes (for refusals sent
    before any handler runs)."""
    body = (json.dumps({"error": message}) + "\n").encode()
    phrase = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


# --- connections: who holds how many, and when each must have said what it wants ------------


class _Conn:
    """One accepted connection: whose it is and whether its deadline passed."""

    def __init__(self, sock: socket.socket, uid: int, admin: bool) -> None:
        self.sock = sock
        self.uid = uid
        self.admin = admin
        self.expired = False

    def expire(self) -> None:
        """Called by the watchdog: the blocked read returns end-of-file; writing still works,
        so the handler can answer 408."""
        self.expired = True
        with contextlib.suppress(OSError):  # already closed by its handler
            self.sock.shutdown(socket.SHUT_RD)


class ConnectionGate:
    """Counts open connections per uid; says who may open another (thread-safe)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._users: Counter[int] = Counter()
        self._admins = 0

    def admit(self, uid: int, admin: bool) -> tuple[int, str] | None:
        """None, and the connection is counted; or (status, one line) for the refusal."""
        limits = self.limits
        with self._lock:
            users = sum(self._users.values())
            if admin:
                if users + self._admins >= limits.total + limits.admin_reserve:
                    return 503, (f"the daemon holds {limits.total + limits.admin_reserve} "
                                 "connections, its limit; retry later")
                self._admins += 1
                return None
            if self._users[uid] >= limits.per_user:
                return 429, (f"{user_name(uid)} already has {limits.per_user} connections open "
                             "to the daemon, the limit per user; close some and retry")
            everyone = users + self._admins
            if users >= limits.total or everyone >= limits.total + limits.admin_reserve:
                return 503, (f"the daemon holds {limits.total} connections, its limit for "
                             "users; retry later")
            self._users[uid] += 1
            return None

    def release(self, uid: int, admin: bool) -> None:
        with self._lock:
            if admin:
                self._admins -= 1
            else:
                self._users[uid] -= 1
                if not self._users[uid]:
                    del self._users[uid]

    def counts(self) -> tuple[int, int]:
        """(user connections, admin connections) open now."""
        with self._lock:
            return sum(self._users.values()), self._admins


class Watchdog:
    """The deadlines of connections waiting for a request or its body; one thread, which
    sleeps until the nearest deadline (never polls)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[_Conn, float] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def set(self, conn: _Conn, seconds: float) -> None:
        with self._cond:
            self._due[conn] = time.monotonic() + seconds
            self._cond.notify()

    def clear(self, conn: _Conn) -> None:
        with self._cond:
            self._due.pop(conn, None)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                for conn, due in list(self._due.items()):
                    if due <= now:
                        del self._due[conn]
                        conn.expire()
                nearest = min(self._due.values(), default=None)
                self._cond.wait(None if nearest is None else max(0.0, nearest - now))


class _Body:
    """The request body: at most Content-Length bytes of the connection; tells the watchdog
    when it has all arrived."""

    def __init__(self, rfile: BinaryIO, length: int, done: Callable[[], None]) -> None:
        self._rfile = rfile
        self.left = length
        self._done = done
        if not length:
            done()

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        data = self._rfile.read(want)
        self.left -= len(data)
        if not self.left:
            self._done()
        return data


# --- the handler ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams
    server: UnixHTTPServer
    client_address: _Conn  # see UnixHTTPServer.process_request
    timeout = SEND_TIMEOUT_S

    def version_string(self) -> str:
        return "vmjobd"  # the Server header; no Python version in every answer

    def address_string(self) -> str:
        return f"uid {self.client_address.uid}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def conn(self) -> _Conn:
        return self.client_address

    def handle_one_request(self) -> None:
        # one deadline for the request line and every header (also the keep-alive idle time)
        self.server.watchdog.set(self.conn, self.server.limits.request_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.server.watchdog.clear(self.conn)
        if self.conn.expired:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The stdlib's own refusals (400, 414, 431, 501, 505) as JSON like every other."""
        del explain
        if self.conn.expired:
            code, message = 408, self._late()
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        self._json(code, {"error": message or phrase})

    def _late(self) -> str:
        return (f"request not received within {self.server.limits.request_timeout_s:g} s "
                "(headers) or at the minimum body rate")

    def _dispatch(self) -> None:
        self.server.watchdog.clear(self.conn)
        body: _Body | None = None
        try:
            if self.conn.expired:
                raise ApiError(408, self._late())
            if not self.request_version.startswith("HTTP/1."):
                raise ApiError(505, "HTTP/1.0 or HTTP/1.1 only")
            if "Transfer-Encoding" in self.headers:
                raise ApiError(411, "send a Content-Length, not a Transfer-Encoding body")
            length = content_length(self.headers.get_all("Content-Length") or [])
            body = self._body(length or 0)
            who = caller(peer_uid(self.connection), self.server.admin_group)
            url = urlsplit(self.path)
            try:
                fields = parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS)
            except ValueError:
                raise ApiError(400, f"more than {MAX_QUERY_FIELDS} query parameters") from None
            query = {k: v[-1] for k, v in fields.items()}
            handler, params = self.server.router.find(self.command, url.path)
            request = ApiRequest(self.command, url.path, query, params, who, length, body,
                                 self.headers.get("Upgrade"))
            result = handler(request)
            if isinstance(result, Upgrade) and (request.upgrade or "").strip() != \
                    result.protocol:
                raise ApiError(426, f"{url.path} is a two-way stream: send "
                                    f"'Connection: Upgrade' and 'Upgrade: {result.protocol}'")
        except ApiError as exc:
            result = self._error(exc.status, exc.message, exc.code)
        except VmjobsError as exc:
            result = self._error(_status_of(exc), str(exc))
        except Exception as exc:  # a bug: say so in one line, keep the daemon up
            log.error("internal error on %s %s:\n%s", self.command, self.path,
                      traceback.format_exc())
            result = self._error(500, f"internal error: {type(exc).__name__}: {exc}")
        self.server.watchdog.clear(self.conn)
        if body is not None and body.left:
            self.close_connection = True  # the rest of the body would be read as a request
        if isinstance(result, Json):
            self._json(result.status, result.body)
        elif isinstance(result, Upgrade):
            self._upgrade(result)
        else:
            self._stream(result)
        if body is not None and body.left:
            self._drain(body)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815 (stdlib's naming)

    def _body(self, length: int) -> _Body:
        if length:
            self.server.watchdog.set(self.conn, self.server.limits.body_deadline_s(length))
        return _Body(self.rfile, length, lambda: self.server.watchdog.clear(self.conn))

    def _error(self, status: int, message: str, code: str | None = None) -> Json:
        if self.conn.expired and status not in (500, 505):
            status, message, code = 408, self._late(), None
        body = {"error": message}
        if code:
            body["code"] = code
        return Json(body, status)

    def _drain(self, body: _Body) -> None:
        """Read what is left of a body nobody read (up to MAX_DRAIN, within the request
        timeout) after answering, so that the client's send does not fail before it reads the
        answer. The answer is complete (and the write side shut) before this starts."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            return
        self.server.watchdog.set(self.conn, self.server.limits.request_timeout_s)
        try:
            budget = MAX_DRAIN
            while body.left and budget > 0:
                data = body.read(min(1 << 16, budget))
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass
        finally:
            self.server.watchdog.clear(self.conn)

    def _json(self, status: int, body: Any) -> None:
        if status >= 400:
            # the request body may be unread: the connection cannot carry another request
            self.close_connection = True
        data = (json.dumps(body) + "\n").encode()
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"  # answer with a status line, never as HTTP/0.9
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client went away before its answer

    def _upgrade(self, upgrade: Upgrade) -> None:
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.SWITCHING_PROTOCOLS)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", upgrade.protocol)
            self.end_headers()
            self.wfile.flush()
            self.connection.settimeout(None)
            upgrade.run(self.rfile, self.connection)
        except OSError:
            pass  # the client went away

    def _stream(self, stream: Stream) -> None:
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", stream.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            for name, value in stream.headers.items():
                self.send_header(name, value)
            self.end_headers()
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            # the client went away (Ctrl+C on logs -f) or stopped reading (send timeout)
            self.close_connection = True
        finally:
            close = getattr(stream.chunks, "close", None)
            if close:
                close()


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # a burst of clients (20 submits at once) must not be refused by a short listen backlog
    request_queue_size = 128

    def __init__(self, path: Path, router: Router, admin_group: str | None,
                 limits: Limits | None = None) -> None:
        self.router = router
        self.admin_group = admin_group
        self.limits = limits or Limits()
        self.gate = ConnectionGate(self.limits)
        self.watchdog = Watchdog()
        self._out_of_fds_logged = 0.0
        claim_socket_path(path)
        super().__init__(str(path), _Handler)
        # Everyone may connect; what they may do is decided per request from their uid.
        os.chmod(path, 0o666)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # the listening socket stays readable: without a pause this would spin
                now = time.monotonic()
                if now - self._out_of_fds_logged > 60:
                    log.warning("cannot accept connections: %s", exc.strerror)
                    self._out_of_fds_logged = now
                time.sleep(0.1)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection against its uid, or refuse it right here (no thread)."""
        del client_address
        try:
            uid = peer_uid(request)
            admin = caller(uid, self.admin_group).admin
        except OSError:
            self.shutdown_request(request)
            return
        refusal = self.gate.admit(uid, admin)
        if refusal is None:
            conn = _Conn(request, uid, admin)
            try:
                super().process_request(request, conn)
                return
            except RuntimeError:  # no thread could be started
                self.gate.release(uid, admin)
                refusal = 503, "the daemon cannot take more connections now; retry later"
        _refuse(request, *refusal)
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn: _Conn = client_address
        try:
            super().process_request_thread(request, conn)
        finally:
            self.watchdog.clear(conn)
            self.gate.release(conn.uid, conn.admin)

    def server_close(self) -> None:
        self.watchdog.stop()
        super().server_close()


def _refuse(sock: socket.socket, status: int, message: str) -> None:
    """Answer without reading the request, never blocking the accepting thread."""
    try:
        sock.setblocking(False)
        sock.send(error_response(status, message))
    except OSError:
        pass


def claim_socket_path(path: Path) -> None:
    """Refuse to start beside a live daemon; remove a dead one's socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a daemon that died
        return
    finally:
        probe.close()
    raise VmjobsError(f"another vmjob daemon already listens on {path}")
