"""The server's pieces without a daemon: connection accounting, the fd budget, the watchdog,
framing and query values (vmjobs.daemon.server)."""

from __future__ import annotations

import io
import socket
import threading

import pytest

from vmjobs.daemon.identity import Caller
from vmjobs.daemon.server import (
    ApiError,
    ApiRequest,
    ConnectionGate,
    Limits,
    Watchdog,
    _Conn,
    content_length,
    error_response,
)


def request(query: dict[str, str] | None = None, body: bytes = b"") -> ApiRequest:
    return ApiRequest("GET", "/", query or {}, {}, Caller(1000, "alice", False),
                      len(body) if body else None, io.BytesIO(body))


def test_gate_bounds_each_user_the_users_together_and_keeps_a_reserve_for_admins() -> None:
    gate = ConnectionGate(Limits(total=4, per_user=2, admin_reserve=1))
    assert [gate.admit(1000, False) for _ in range(2)] == [None, None]
    refused = gate.admit(1000, False)
    assert refused is not None and refused[0] == 429
    assert [gate.admit(1001, False) for _ in range(2)] == [None, None]
    full = gate.admit(1002, False)
    assert full == (503, "the daemon holds 4 connections, its limit for users; retry later")
    assert gate.admit(0, True) is None  # the reserve
    assert gate.admit(0, True) == (503, "the daemon holds 5 connections, its limit; retry later")
    assert gate.counts() == (4, 1)
    gate.release(1000, False)
    assert gate.admit(1002, False) is None  # a slot came back
    gate.release(0, True)
    assert gate.counts() == (4, 0)


def test_admins_may_use_the_users_slots_too_but_the_sum_is_bounded() -> None:
    gate = ConnectionGate(Limits(total=2, per_user=1, admin_reserve=1))
    assert [gate.admit(0, True) for _ in range(3)] == [None, None, None]
    assert gate.admit(1000, False) is not None
    assert gate.admit(0, True) is not None


@pytest.mark.parametrize(("nofile", "total", "per_user"), [
    (1_048_576, 512, 64), (20_000, 512, 64), (1024, 512, 64), (256, 160, 64), (64, 1, 1)])
def test_limits_fit_the_open_files_limit(nofile: int, total: int, per_user: int) -> None:
    fitted = Limits().fit_to_fds(nofile)
    assert (fitted.total, fitted.per_user) == (total, per_user)
    assert fitted.total + fitted.admin_reserve < nofile or fitted.total == 1


def test_watchdog_expires_a_late_connection_and_spares_a_cleared_one() -> None:
    watchdog = Watchdog()
    pairs = [socket.socketpair() for _ in range(2)]
    late, cleared = (_Conn(a, 1000, False) for a, _b in pairs)
    try:
        watchdog.set(cleared, 0.2)
        watchdog.clear(cleared)
        done = threading.Event()

        def read() -> None:
            late.sock.recv(1)  # blocks until the watchdog shuts the read side
            done.set()

        threading.Thread(target=read, daemon=True).start()
        watchdog.set(late, 0.2)
        assert done.wait(30)
        assert late.expired and not cleared.expired
    finally:
        watchdog.stop()
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize(("values", "length"), [([], None), (["0"], 0), ([" 12 "], 12),
                                                 (["7", "7"], 7)])
def test_content_length_accepted(values: list[str], length: int | None) -> None:
    assert content_length(values) == length


@pytest.mark.parametrize("values", [["abc"], ["-1"], ["+1"], ["1_0"], ["1e3"], ["0x10"],
                                    [""], ["1" * 20], ["1", "2"]])
def test_content_length_refused(values: list[str]) -> None:
    with pytest.raises(ApiError) as info:
        content_length(values)
    assert info.value.status == 400


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("2.5", 2.5), ("3600", 3600.0)])
def test_query_number_accepted(text: str, value: float) -> None:
    assert request({"timeout": text}).number("timeout", 0, 3600) == value


def test_query_number_absent_is_none() -> None:
    assert request().number("timeout", 0, 3600) is None
    assert request({"timeout": ""}).number("timeout", 0, 3600) is None


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "-1", "3600.5", "1e3", " 5",
                                  "0x10", "1_0", "9" * 40])
def test_query_number_refused(text: str) -> None:
    with pytest.raises(ApiError) as info:
        request({"timeout": text}).number("timeout", 0, 3600)
    assert (info.value.status, info.value.message) == (
        400, f"query parameter timeout={text!r} must be a number from 0 to 3600")


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "request body is nested too deeply"),
    (b'{"a": NaN}', "request body is not JSON: NaN is not a JSON number"),
    (b'{"a": -Infinity}', "request body is not JSON: -Infinity is not a JSON number"),
    (b'{"a": 1e999}', "request body is not JSON: 1e999 is beyond the range of a number"),
    (b"[1]", "request body must be a JSON object"),
])
def test_json_body_refused(body: bytes, message: str) -> None:
    with pytest.raises(ApiError) as info:
        request(body=body).json()
    assert (info.value.status, info.value.message) == (400, message)


def test_json_body_cut_short_is_refused() -> None:
    req = ApiRequest("POST", "/", {}, {}, Caller(1000, "alice", False), 10, io.BytesIO(b"{}"))
    with pytest.raises(ApiError, match="^request body ended after 2 of 10 bytes$"):
        req.json()


def test_a_refusal_is_a_whole_json_answer() -> None:
    raw = error_response(429, "too many")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 429 Too Many Requests"
    assert b"Connection: close" in head and b"Content-Type: application/json" in head
    assert body == b'{"error": "too many"}\n'
