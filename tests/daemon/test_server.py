"""The daemon cannot be stalled: connection limits per uid and in total (with a reserve for
admins), deadlines for requests, its own open-files limit, and HTTP-level values refused with
a JSON 400 — tried as real unix users against a real `vmjob serve`.

These daemons serve libvirt's test driver (one test also connects to the real libvirtd);
no guest is booted, so they need neither the guest image nor the guest lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import ROOT, Daemon, write_config
from tests.daemon.users import ADMIN_GROUP, User, as_user, become, make_users, run_as
from vmjobs.client import ApiFailure, Client
from vmjobs.errors import VmjobsError
from vmjobs.transport import Target

HALF_SENT = b"GET /v1/status HTTP/1.1\r\nHost: vmjobs\r\n"  # no blank line: never complete
BOUND_S = 60.0  # generous bound for anything the daemon must do "soon"


def make(name: str, hosts: list[dict[str, Any]] | None = None, **extra: Any) -> Daemon:
    """A daemon (on libvirt's test driver unless `hosts` say otherwise) with a spool of its
    own (not started)."""
    ROOT.mkdir(parents=True, exist_ok=True)
    ROOT.chmod(0o755)
    spool = ROOT / f"srv-{name}"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(mode=0o755)
    spool.chmod(0o755)  # the users of these tests reach the socket inside
    socket_path = spool / "vmjobs.sock"
    config = write_config(spool / "config.yaml", spool, socket_path,
                          hosts or [{"name": "t", "uri": "test:///default"}], **extra)
    return Daemon(name, spool, config, socket_path, spool / "daemon.log")


@contextlib.contextmanager
def running(daemon: Daemon, soft_nofile: int | None = None) -> Iterator[Daemon]:
    """Start `daemon` (inheriting a lowered soft open-files limit, as under a stock
    `ulimit -n 1024`), stop it afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft_nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, saved[1]))
        daemon.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    try:
        yield daemon
    finally:
        daemon.stop()


# --- acting as another unix user -------------------------------------------------------------


def connect_as(user: User, path: Path, count: int, send: bytes = HALF_SENT
               ) -> list[socket.socket]:
    """`count` connections made by `user` (SO_PEERCRED is fixed at connect), each having sent
    `send`; a forked child connects and hands the sockets over (SCM_RIGHTS)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            become(user)
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))  # blocking: waits while the listen queue is full
                sock.settimeout(BOUND_S)
                with contextlib.suppress(OSError):  # a refused one may be closed already
                    sock.sendall(send)
                socket.send_fds(theirs, [b"s"], [sock.fileno()])
                sock.close()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    socks = []
    try:
        for _ in range(count):
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
            assert fds, "the child stopped handing over connections"
            socks.append(socket.socket(fileno=fds[0]))
    finally:
        ours.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return socks


def status_of(path: Path, timeout: float = BOUND_S) -> Callable[[], Any]:
    def work() -> Any:
        client = Client(Target(path))
        try:
            return client.call("GET", "/v1/status", timeout=timeout)["you"]
        finally:
            client.close()
    return work


def answer(sock: socket.socket, timeout: float = BOUND_S) -> tuple[int, dict[str, Any]]:
    """The daemon's whole answer on `sock` (until it closes): status and JSON body."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split()[1]), json.loads(body)


def quiet(sock: socket.socket) -> bool:
    """Nothing was answered on `sock` and it is open."""
    try:
        sock.recv(1, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def soft_nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# --- connections -----------------------------------------------------------------------------


def test_one_users_half_sent_requests_do_not_lock_out_others() -> None:
    """The reported attack: one user's hundreds of half-sent requests. Started, like under a
    stock shell, with a soft open-files limit of 256 (the issue's 1,024 scaled down)."""
    daemon = make("flood", admin_group=ADMIN_GROUP, request_timeout=600)
    with running(daemon, soft_nofile=256), make_users(2) as (alice, bob):
        assert daemon.proc is not None
        pid = daemon.proc.pid
        soft, hard = soft_nofile(pid)
        assert soft == hard, "the daemon raises its own soft open-files limit"

        flood = connect_as(alice, daemon.socket, 300)
        try:
            # every connection past alice's 64 is refused at once, with a JSON 429
            for sock in flood[64:]:
                status, body = answer(sock)
                assert status == 429, body
                assert body["error"] == (f"{alice.name} already has 64 connections open to "
                                         "the daemon, the limit per user; close some and retry")
            assert all(quiet(s) for s in flood[:64])  # held: they may still send

            # bob and root are served meanwhile
            assert run_as(bob, status_of(daemon.socket)) == {
                "uid": bob.uid, "name": bob.name, "admin": False}
            listing = as_user(bob, "list", "--url", f"unix://{daemon.socket}")
            assert listing.code == 0, listing
            client = daemon.client()
            assert client.status()["you"]["admin"] is True
            client.close()
        finally:
            close_all(flood)


def test_connections_are_bounded_per_user_and_in_total_with_a_reserve_for_admins() -> None:
    daemon = make("limits", admin_group=ADMIN_GROUP, request_timeout=600, max_connections=8,
                  max_connections_per_user=4)
    url = f"unix://{daemon.socket}"
    with running(daemon), make_users(4) as (alice, bob, carol, dave):
        held = connect_as(alice, daemon.socket, 4) + connect_as(bob, daemon.socket, 4)
        try:
            extra = connect_as(alice, daemon.socket, 1)[0]
            status, body = answer(extra)
            assert (status, body["error"]) == (429, f"{alice.name} already has 4 connections "
                                               "open to the daemon, the limit per user; close "
                                               "some and retry")
            # the users' 8 slots are full: carol is refused, with a JSON 503 ...
            refused = run_as(carol, status_of(daemon.socket))
            assert refused == {"raised": "ApiFailure: the daemon holds 8 connections, its limit "
                                         "for users; retry later"}
            cli = as_user(carol, "list", "--url", url)
            assert (cli.code, cli.err) == (1, "vmjob: the daemon holds 8 connections, its "
                                              "limit for users; retry later\n")
            # ... while root and the admin group still get in
            client = daemon.client()
            assert client.status()["you"]["admin"] is True
            client.close()
            subprocess.run(["gpasswd", "-a", dave.name, ADMIN_GROUP], check=True,
                           capture_output=True)
            assert run_as(dave, status_of(daemon.socket))["admin"] is True
            assert all(quiet(s) for s in held)
        finally:
            close_all(held)
        # slots come back when connections close
        deadline = time.monotonic() + BOUND_S
        while (got := run_as(carol, status_of(daemon.socket))) != {
                "uid": carol.uid, "name": carol.name, "admin": False}:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)


def test_requests_must_arrive_in_time() -> None:
    daemon = make("deadlines", request_timeout=2)
    with running(daemon):
        late = {"error": "request not received within 2 s (headers) or at the minimum body "
                         "rate"}

        def timed(send: bytes, drip: bytes = b"") -> tuple[float, int, dict[str, Any]]:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            started = time.monotonic()
            sock.sendall(send)
            # a client that keeps sending a byte now and then gains no time
            while drip and time.monotonic() - started < BOUND_S:
                try:
                    sock.sendall(drip)
                except OSError:
                    break  # the daemon stopped reading
                if not quiet(sock):
                    break
                time.sleep(0.2)
            status, body = answer(sock)
            sock.close()
            return time.monotonic() - started, status, body

        for send, drip in ((HALF_SENT, b""), (b"GET /v1/sta", b""),
                           (HALF_SENT, b"X"),  # an endless header, dripped
                           (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", b"")):
            elapsed, status, body = timed(send, drip)
            assert (status, body) == (408, late), send
            assert 2 <= elapsed < BOUND_S

        # a connection that says nothing, or nothing more after an answer, is closed
        for first in (b"", b"GET /v1/status HTTP/1.1\r\nHost: vmjobs\r\n\r\n"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            sock.sendall(first)
            sock.settimeout(BOUND_S)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") == bool(first)
            sock.close()


def test_a_missing_admin_group_is_a_warning_until_it_exists() -> None:
    daemon = make("nogroup", admin_group=ADMIN_GROUP)
    subprocess.run(["groupdel", ADMIN_GROUP], check=False, capture_output=True)
    warning = (f"{daemon.config}: admin_group: no group {ADMIN_GROUP!r} on this system: only "
               "root acts on every job")
    with running(daemon):
        client = daemon.client()
        assert client.status()["warnings"] == [warning]
        assert f"vmjobd: {warning}" in daemon.log_text()
        with make_users(1):  # creates the group: membership is read per request
            assert client.status()["warnings"] == []
        client.close()


def test_one_libvirt_host_under_two_names_is_connected_once() -> None:
    """The config cannot tell that these two URIs reach one libvirtd; the host's UUID can.
    (The daemon leaves guests of jobs it does not know alone: other tests' guests are safe.)"""
    second = f"qemu:///system?socket={os.path.realpath('/var/run/libvirt/libvirt-sock')}"
    daemon = make("twonames", hosts=[{"name": "a", "uri": "qemu:///system"},
                                     {"name": "b", "uri": second}])
    with running(daemon):
        client = daemon.client()
        views = {v["name"]: v for v in client.hosts()}
        client.close()
        assert views["a"]["state"] == "up"
        assert views["b"]["state"] == "down"
        assert re.fullmatch(r"host b: the same libvirt host as a \(host UUID [0-9a-f-]{36}\); "
                            r"configure each host once", views["b"]["error"]), views["b"]
    direct = daemon.vmjob("hosts", "--json")
    assert direct.returncode == 0, direct.stderr
    assert [v["state"] for v in json.loads(direct.stdout)] == ["up", "down"]


# --- values and framing ----------------------------------------------------------------------


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE = [
    # (raw request, status, the error line)
    (b"GET /v1/jobs/x/wait?timeout=nan HTTP/1.1\r\n\r\n", 400,
     "query parameter timeout='nan' must be a number from 0 to 3600"),
    (b"GET /v1/jobs/x/wait?timeout=inf HTTP/1.1\r\n\r\n", 400,
     "query parameter timeout='inf' must be a number from 0 to 3600"),
    (b"GET /v1/jobs/x/wait?timeout=-1 HTTP/1.1\r\n\r\n", 400,
     "query parameter timeout='-1' must be a number from 0 to 3600"),
    (b"GET /v1/jobs/x/wait?timeout=1e9 HTTP/1.1\r\n\r\n", 400,
     "query parameter timeout='1e9' must be a number from 0 to 3600"),
    (b"GET /v1/jobs/x/wait?timeout=3601 HTTP/1.1\r\n\r\n", 400,
     "query parameter timeout='3601' must be a number from 0 to 3600"),
    (b"GET /v1/jobs?all=maybe HTTP/1.1\r\n\r\n", 400,
     "query parameter all='maybe' must be 1/0, true/false or yes/no"),
    (b"GET /v1/jobs?" + b"&".join(b"a%d=1" % i for i in range(40)) + b" HTTP/1.1\r\n\r\n",
     400, "more than 32 query parameters"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400,
     "Content-Length 'abc' is not a whole number of bytes"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400,
     "Content-Length '-1' is not a whole number of bytes"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n", 400,
     "Content-Length '1_0' is not a whole number of bytes"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "conflicting Content-Length headers"),
    (b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 411,
     "send a Content-Length, not a Transfer-Encoding body"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(DEEP) + DEEP, 400,
     "request body is nested too deeply"),
    (b'POST /v1/jobs HTTP/1.1\r\nContent-Length: 26\r\n\r\n{"time_limit_s": NaN     }', 400,
     "request body is not JSON: NaN is not a JSON number"),
    (b'POST /v1/jobs HTTP/1.1\r\nContent-Length: 26\r\n\r\n{"time_limit_s": 1e400   }', 400,
     "request body is not JSON: 1e400 is beyond the range of a number"),
    (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n", 413,
     "request body over 4 MiB"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
    (b"GET /v1/status HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120))
     + b"\r\n", 431, "Too many headers"),
    (b"GET /v1/status HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    (b"BREW /v1/status HTTP/1.1\r\n\r\n", 501, "Unsupported method ('BREW')"),
    (b"GET /v1/status HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version (2.0)"),
    (b"GET /v1/status\r\n\r\n", 505, "HTTP/1.0 or HTTP/1.1 only"),
    (b"GET /v1/nothing HTTP/1.1\r\n\r\n", 404, "no such endpoint: /v1/nothing (see docs/api.md)"),
]


@pytest.fixture(scope="module")
def values_daemon() -> Iterator[Daemon]:
    hosts = [{"name": "t", "uri": "test:///default", "reserved_cpus": "0,40"}]
    with running(make("values", hosts=hosts)) as daemon:
        yield daemon


def test_the_daemon_says_what_the_host_contradicts(values_daemon: Daemon) -> None:
    warning = "host t: reserved_cpus: cpu 40 is not on this host (it has 0-15)"
    client = values_daemon.client()
    assert client.hosts()[0]["warnings"] == [warning]
    client.close()
    assert f"vmjobd: {warning}" in values_daemon.log_text()


@pytest.mark.parametrize(("raw", "status", "error"), HOSTILE,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(HOSTILE)])
def test_hostile_requests_get_a_json_error_and_the_daemon_stays_well(
        values_daemon: Daemon, raw: bytes, status: int, error: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(values_daemon.socket))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(raw)
    got = answer(sock)
    sock.close()
    assert got == (status, {"error": error})
    client = values_daemon.client()
    assert client.status()["you"]["uid"] == 0  # still serving
    client.close()


def test_after_hostile_requests_the_daemon_is_idle(values_daemon: Daemon) -> None:
    assert values_daemon.proc is not None
    pid = values_daemon.proc.pid
    baseline = threads(pid)
    for raw, _status, _error in HOSTILE * 2:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(values_daemon.socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        answer(sock)
        sock.close()
    # every connection's thread ends ...
    deadline = time.monotonic() + BOUND_S
    while threads(pid) > baseline:
        assert time.monotonic() < deadline, (threads(pid), baseline)
        time.sleep(0.05)
    # ... and nothing spins: an idle daemon uses next to no cpu (a busy loop takes ~1 s/s)
    before = cpu_seconds(pid)
    time.sleep(3)
    assert cpu_seconds(pid) - before < 0.5


# --- a refusal is read, never a broken pipe ---------------------------------------------------


@pytest.mark.parametrize("pad", [1 << 20, 6 << 20], ids=["drained", "beyond-the-drain"])
def test_a_refused_admin_command_reads_its_refusal(values_daemon: Daemon, pad: int) -> None:
    """The daemon answers 403 before reading the body: a body larger than the socket's
    buffers used to fail the client's send with a broken pipe."""
    path = values_daemon.socket

    def rebalance() -> Any:
        client = Client(Target(path))
        try:
            list(client.progress("/v1/rebalance", {"dry_run": True, "pad": "x" * pad}))
        except ApiFailure as exc:
            return [exc.status, str(exc)]
        except VmjobsError as exc:
            return ["other", str(exc)]
        finally:
            client.close()
        return "accepted"

    with make_users(1) as (alice,):
        for _ in range(3):
            assert run_as(alice, rebalance) == [
                403, f"rebalancing is for administrators (root or the admin group); you are "
                     f"{alice.name}"]
        for _ in range(5):
            result = as_user(alice, "rebalance", "--url", f"unix://{path}")
            assert (result.code, result.err) == (
                1, f"vmjob: rebalancing is for administrators (root or the admin group); you "
                   f"are {alice.name}\n")
