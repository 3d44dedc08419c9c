"""HTTP/1.1 + JSON over a unix socket, with the caller's identity from SO_PEERCRED.

Standard tools speak it (`curl --unix-socket /run/vmjobs/vmjobs.sock http://vmjobs/v1/jobs`).
One thread per connection (`ThreadingMixIn`): a `wait` or `logs -f` blocks only its own thread.
Handlers get an `ApiRequest` and return a `Json` or a `Stream`; an `ApiError` becomes a JSON
error body with one line meant for the user.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import socketserver
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from vmjobs.daemon.identity import Caller, caller, peer_uid
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError

log = logging.getLogger("vmjobs.daemon")
MAX_JSON_BODY = 4 << 20


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
    body: BinaryIO

    def json(self) -> dict[str, Any]:
        if self.length is None or self.length == 0:
            return {}
        if self.length > MAX_JSON_BODY:
            raise ApiError(413, f"request body over {MAX_JSON_BODY >> 20} MiB")
        try:
            data = json.loads(self.body.read(self.length))
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    def number(self, name: str) -> float | None:
        value = self.query.get(name)
        if value is None or value == "":
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):  # nan, inf: a wait no clock can measure
            raise ApiError(400, f"query parameter {name}={value!r} is not a number")
        return number


@dataclass
class Json:
    body: Any
    status: int = 200


@dataclass
class Stream:
    chunks: Iterator[bytes]
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[ApiRequest], Json | Stream]


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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams
    server: UnixHTTPServer

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        try:
            who = caller(peer_uid(self.connection), self.server.admin_group)
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            handler, params = self.server.router.find(self.command, url.path)
            length_text = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raise ApiError(411, "send a Content-Length, not a chunked body")
            length = int(length_text) if length_text else None
            request = ApiRequest(self.command, url.path, query, params, who, length, self.rfile)
            result = handler(request)
        except ApiError as exc:
            body = {"error": exc.message}
            if exc.code:
                body["code"] = exc.code
            self._json(exc.status, body)
            return
        except VmjobsError as exc:
            self._json(_status_of(exc), {"error": str(exc)})
            return
        except Exception as exc:  # a bug: say so in one line, keep the daemon up
            log.error("internal error on %s %s:\n%s", self.command, self.path,
                      traceback.format_exc())
            self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        if isinstance(result, Json):
            self._json(result.status, result.body)
        else:
            self._stream(result)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815 (stdlib's naming)

    def _json(self, status: int, body: Any) -> None:
        if status >= 400:
            # the request body may be unread: the connection cannot carry another request
            self.close_connection = True
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, stream: Stream) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in stream.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. Ctrl+C on logs -f)
        finally:
            close = getattr(stream.chunks, "close", None)
            if close:
                close()


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # a burst of clients (20 submits at once) must not be refused by a short listen backlog
    request_queue_size = 128

    def __init__(self, path: Path, router: Router, admin_group: str | None) -> None:
        self.router = router
        self.admin_group = admin_group
        claim_socket_path(path)
        super().__init__(str(path), _Handler)
        # Everyone may connect; what they may do is decided per request from their uid.
        os.chmod(path, 0o666)


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
