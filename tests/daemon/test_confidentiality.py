"""Issue 15, privilege and confidentiality: no user reads another's data, makes root write for
them, or fills the spool for everyone. Two real unix users, the real daemon, real guests.

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-daemon-spool flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_confidentiality.py
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import Daemon
from tests.daemon.users import User, as_user, make_users, run_as
from vmjobs.client import Client
from vmjobs.transport import Target

QUOTA_MIB = 24
UPLOAD_TTL_S = 2


@pytest.fixture(scope="module")
def users() -> Iterator[list[User]]:
    with make_users(2) as made:
        yield made


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("conf", user_spool_quota=f"{QUOTA_MIB}M", upload_ttl=UPLOAD_TTL_S)
    d.start()
    yield d
    d.stop()


# --- acting as a user ------------------------------------------------------------------------


def try_reads(paths: list[str]) -> dict[str, str]:
    """What happens when the current user opens each path (a file) or lists it (a dir)."""
    seen = {}
    for path in paths:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
            seen[path] = "read"
        except PermissionError:
            seen[path] = "refused"
        except FileNotFoundError:
            seen[path] = "missing"
    return seen


def api_submit(socket_path: str, body: dict[str, Any]) -> dict[str, Any]:
    client = Client(Target(Path(socket_path)))
    try:
        return client.submit(body)
    finally:
        client.close()


def post_upload(socket_path: str, data_hex: str) -> list[Any]:
    """POST /v1/uploads by hand (the daemon may answer before it has read the body): status
    and JSON answer."""
    data = bytes.fromhex(data_hex)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(socket_path)
    sock.sendall(b"POST /v1/uploads HTTP/1.1\r\nHost: vmjobs\r\nConnection: close\r\n"
                 b"Content-Type: application/x-tar\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode())
    # refused before the body was read: the answer is waiting all the same
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    response = http.client.HTTPResponse(sock)
    response.begin()
    answer = json.loads(response.read())
    sock.close()
    return [response.status, answer]


def upload_as(user: User, daemon: Daemon, archive: bytes) -> tuple[int, dict[str, Any]]:
    status, answer = run_as(user, post_upload, str(daemon.socket), archive.hex())
    return status, answer


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def a_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def uploads_left(daemon: Daemon) -> list[str]:
    return sorted(p.name for p in (daemon.spool / "uploads").iterdir())


# --- root writes where a user says -----------------------------------------------------------


def test_an_admins_wait_never_writes_where_the_owner_asked(daemon: Daemon, users: list[User],
                                                          tmp_path: Path) -> None:
    alice, bob = users
    root_only = tmp_path / "root-only"  # under pytest's 0700 tmp: root's alone
    root_only.mkdir(mode=0o700)
    bobs = daemon.spool / "bob-private"
    bobs.mkdir(mode=0o700)
    os.chown(bobs, bob.uid, bob.gid)
    alices = daemon.spool / "alice-out"
    alices.mkdir(mode=0o700)
    os.chown(alices, alice.uid, alice.gid)
    job = ["sh", "-c", "echo result > /job/out/result.txt"]
    ids = {}
    for name, target in (("root", root_only / "out"), ("bob", bobs / "out"),
                         ("alice", alices / "out")):
        view = run_as(alice, api_submit, str(daemon.socket),
                      {"argv": job, "mem": "256M", "output": str(target)})
        ids[name] = view["id"]
    daemon.wait_all_ended(list(ids.values()), timeout=300)

    # root waits without --output: the job's recorded path is alice's word, not root's
    for name in ("root", "bob"):
        waited = daemon.vmjob("wait", ids[name])
        assert waited.returncode == 0, waited.stderr
    assert list(root_only.iterdir()) == []
    assert list(bobs.iterdir()) == []
    assert "is not written where they asked" in waited.stderr

    # alice waits: her output lands where she asked, written as alice
    waited_a = as_user(alice, "--config", str(daemon.config), "wait", ids["alice"])
    assert waited_a.code == 0, waited_a.err
    result = alices / "out" / "result.txt"
    assert result.read_text() == "result\n"
    assert (result.stat().st_uid, (alices / "out").stat().st_uid) == (alice.uid, alice.uid)

    # an admin who asks gets it, in the admin's own place
    mine = tmp_path / "admin-copy"
    assert daemon.vmjob("wait", ids["root"], "--output", str(mine)).returncode == 0
    assert (mine / "result.txt").read_text() == "result\n"


# --- the spool is root's (and QEMU's) ---------------------------------------------------------


def test_another_user_reads_nothing_of_a_job_and_the_owner_gets_it_through_the_api(
        daemon: Daemon, users: list[User]) -> None:
    alice, bob = users
    inputs = daemon.spool / "alice-in"
    inputs.mkdir(mode=0o700)
    (inputs / "secret.txt").write_text("input-secret\n")
    (inputs / "secret.txt").chmod(0o600)
    for path in (inputs, inputs / "secret.txt"):
        os.chown(path, alice.uid, alice.gid)
    submitted = as_user(alice, "--config", str(daemon.config), "submit", "--mem", "256M",
                        "--env", "API_TOKEN=token-secret", "--input", str(inputs), "--",
                        "sh", "-c", "cat /job/secret.txt; echo $API_TOKEN > /job/out/tok; "
                        "sleep 2")
    assert submitted.code == 0, submitted.err
    job_id = submitted.out.strip()
    job_dir = daemon.spool / "jobs" / job_id
    client = daemon.client()
    deadline = time.monotonic() + 300
    while client.job(job_id)["state"] in ("QUEUED", "PLACED", "STARTING"):
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)

    def private_paths() -> list[str]:
        names = list(job_dir.rglob("*"))
        store = [daemon.spool / f"state.db{s}" for s in ("", "-wal", "-shm")]
        return [str(p) for p in [daemon.spool / "jobs", job_dir, *names, *store,
                                 daemon.spool / "uploads"]]

    # while it runs (or, on a fast day, once it has ended: the rule is the same)
    running = [p for p in private_paths() if os.path.exists(p)]
    for name in ("initrd", "output.raw", "input/secret.txt"):
        assert str(job_dir / name) in running, (name, running)
    for suffix in ("", "-wal", "-shm"):  # the daemon holds the store open, in WAL mode
        assert str(daemon.spool / f"state.db{suffix}") in running
    seen = run_as(bob, try_reads, running)
    assert set(seen.values()) == {"refused"}, seen

    daemon.wait_all_ended([job_id], timeout=300)
    ended = [p for p in private_paths() if os.path.exists(p)]
    for name in ("initrd", "output.raw", "console.local.log", "out/tok", "input/secret.txt",
                 "domain.xml"):
        assert str(job_dir / name) in ended, (name, ended)
    seen = run_as(bob, try_reads, ended)
    assert set(seen.values()) == {"refused"}, seen
    # the modes that do it: nothing readable or listable but by root; what lies inside
    # input/ and out/ keeps its own modes behind their 0700
    for path in ended:
        if Path(path).parent in (job_dir / "input", job_dir / "out"):
            continue
        mode = os.stat(path).st_mode & 0o777
        assert mode & 0o044 == 0, f"{path} is {oct(mode)}"
    assert {p.name: p.stat().st_mode & 0o777 for p in job_dir.iterdir() if p.is_dir()} \
        == {"input": 0o700, "out": 0o700}

    # its owner gets its console and its output through the API
    logs = as_user(alice, "--config", str(daemon.config), "logs", job_id)
    assert "input-secret" in logs.out, logs
    fetched = daemon.spool / "alice-fetch"
    fetched.mkdir(mode=0o700)
    os.chown(fetched, alice.uid, alice.gid)
    waited = as_user(alice, "--config", str(daemon.config), "wait", job_id, "--output",
                     str(fetched / "o"))
    assert waited.code == 0, waited.err
    assert (fetched / "o" / "tok").read_text() == "token-secret\n"
    # and bob, through the API, gets neither
    assert as_user(bob, "--config", str(daemon.config), "logs", job_id).code != 0


# --- uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_sparse_member_is_refused_before_it_unpacks(daemon: Daemon, users: list[User],
                                                      tmp_path: Path, fmt: str) -> None:
    alice, _ = users
    src = tmp_path / "src"
    src.mkdir()
    with (src / "big").open("wb") as big:
        big.truncate(3 << 30)
        big.write(b"x")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive), "-C", str(src),
                    "big"], check=True)
    data = archive.read_bytes()
    assert len(data) < 20_000  # 3 GiB in a few KB
    before = uploads_left(daemon)
    status, answer = upload_as(alice, daemon, data)
    assert (status, answer.get("code")) == (413, "too_large"), answer
    assert "big is a sparse file" in answer["error"]
    assert uploads_left(daemon) == before


def test_members_the_guest_would_refuse_are_refused_at_upload(daemon: Daemon,
                                                            users: list[User]) -> None:
    alice, _ = users
    link = tarfile.TarInfo("data/link")
    link.type, link.linkname = tarfile.SYMTYPE, "file"
    fifo = tarfile.TarInfo("data/fifo")
    fifo.type = tarfile.FIFOTYPE
    outside = a_file("../escape", b"x")
    for members, words in (([a_file("data/file", b"x"), (link, None)], "data/link is a symlink"),
                           ([(fifo, None)], "data/fifo is not a regular file"),
                           ([outside], "../escape: leads outside the input directory")):
        status, answer = upload_as(alice, daemon, tar_of(members))
        assert status == 400 and words in answer["error"], answer
        assert str(daemon.spool) not in answer["error"]
    assert uploads_left(daemon) == []


def test_symlink_in_input_is_refused_at_submit_without_spool_paths(daemon: Daemon,
                                                                  users: list[User]) -> None:
    alice, _ = users
    inputs = daemon.spool / "alice-links"
    inputs.mkdir()
    (inputs / "file").write_text("x\n")
    (inputs / "link").symlink_to("file")
    os.chown(inputs, alice.uid, alice.gid)
    before = daemon.query("SELECT COUNT(*) FROM jobs")[0][0]
    refused = as_user(alice, "--config", str(daemon.config), "submit", "--input", str(inputs),
                      "--", "true")
    assert refused.code == 2  # a bad --input is a usage error
    assert refused.err.strip().endswith(
        f"--input: {inputs / 'link'} is a symlink; only regular files and directories are "
        "copied into the guest")
    assert str(daemon.spool / "jobs") not in refused.err
    assert daemon.query("SELECT COUNT(*) FROM jobs")[0][0] == before
    assert uploads_left(daemon) == []


def test_quota_is_per_user_and_unclaimed_uploads_go_promptly(daemon: Daemon,
                                                             users: list[User]) -> None:
    alice, bob = users
    ten_mib = tar_of([a_file("blob", os.urandom(10 << 20))])
    status, first = upload_as(alice, daemon, ten_mib)
    assert status == 201, first
    status, second = upload_as(alice, daemon, ten_mib)
    assert (status, second.get("code")) == (413, "quota"), second
    assert f"of your {QUOTA_MIB:.1f} MiB quota" in second["error"]
    status, bobs = upload_as(bob, daemon, ten_mib)  # alice's use is not bob's
    assert status == 201, bobs
    # nobody claims them: gone after upload_ttl (the sweeper runs every ttl/2)
    deadline = time.monotonic() + 60
    while uploads_left(daemon):
        assert time.monotonic() < deadline, uploads_left(daemon)
        time.sleep(0.2)
    status, again = upload_as(alice, daemon, ten_mib)
    assert status == 201, again  # the quota came back with the space


def test_an_upload_is_refused_when_the_spool_would_run_short(make_daemon: Any,
                                                             users: list[User]) -> None:
    alice, _ = users
    full = make_daemon("conf-full", spool_min_free="100000G")
    full.start()
    try:
        status, answer = upload_as(alice, full, tar_of([a_file("f", b"x")]))
        assert (status, answer.get("code")) == (507, "no_space"), answer
        assert "spool_min_free" in answer["error"]
        assert uploads_left(full) == []
    finally:
        full.stop()


def test_an_upload_is_claimed_by_its_uploader_only(daemon: Daemon, users: list[User]) -> None:
    alice, bob = users
    status, upload = upload_as(alice, daemon, tar_of([a_file("f", b"alice's\n")]))
    assert status == 201, upload

    def submit_with(socket_path: str, token: str) -> str:
        client = Client(Target(Path(socket_path)))
        try:
            client.submit({"argv": ["true"], "input": token})
            return "accepted"
        except Exception as exc:  # the refusal, as the client reports it
            return str(exc)
        finally:
            client.close()

    refused = run_as(bob, submit_with, str(daemon.socket), upload["upload"])
    assert refused.startswith(f"no upload '{upload['upload']}' of yours"), refused
    assert str(daemon.spool) not in refused
