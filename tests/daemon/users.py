"""Real unix users for the ownership tests, and running the CLI as one of them.

The CLI runs in a forked child that has dropped to the user's uid and groups, so the daemon
sees that uid through SO_PEERCRED exactly as it would for the user's own shell. (Our Python
lives under /root here, which other users cannot execute; forking avoids needing another.)
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from click.testing import CliRunner

ADMIN_GROUP = "vmjobs-dtest-admins"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@contextmanager
def make_users(count: int) -> Iterator[list[User]]:
    """`count` fresh users (and the admin group, empty); all removed afterwards."""
    names = [f"vmjt{os.getpid() % 10000}{chr(ord('a') + i)}" for i in range(count)]
    subprocess.run(["groupadd", ADMIN_GROUP], check=False, capture_output=True)
    try:
        for name in names:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            name], check=True, capture_output=True)
        yield [User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in names]
    finally:
        for name in names:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", ADMIN_GROUP], check=False, capture_output=True)


def become(user: User) -> None:
    """Drop to `user`'s uid, gid and groups (in a forked child: there is no way back)."""
    os.setgroups(os.getgrouplist(user.name, user.gid))
    os.setgid(user.gid)
    os.setuid(user.uid)


def run_as(user: User, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child that has become `user`; its JSON-able result. An exception
    in fn comes back as {"raised": "Type: message"} for the caller to assert on."""
    preload_cli()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run, report, never return
        code = 99
        try:
            os.close(read_end)
            become(user)
            try:
                result = fn(*args)
            except Exception as exc:  # reported to the parent, which asserts on it
                result = {"raised": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(result, pipe)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, \
        f"child failed: {getattr(fn, '__name__', fn)}"
    return json.loads(data)


# What the CLI imports on use (its commands load lazily, the client imports tar and YAML only
# when needed): imported before the fork, since this Python's stdlib lives under /root, which
# the user the child becomes cannot read.
LAZY_IMPORTS = ("yaml", "tarfile", "tempfile", "shutil", "grp", "vmjobs.safetar",
                "vmjobs.guest_protocol")


def preload_cli() -> None:
    from vmjobs.cli import COMMANDS

    for name in (*LAZY_IMPORTS, *(target.partition(":")[0] for target in COMMANDS.values())):
        importlib.import_module(name)


def as_user(user: User, *args: str) -> Result:
    """`vmjob ARGS...` as `user`: exit code, stdout, stderr."""
    def invoke() -> dict[str, Any]:
        from vmjobs.cli import cli

        os.environ["HOME"] = "/"
        os.environ.pop("VMJOBS_URL", None)
        result = CliRunner().invoke(cli, list(args))
        return {"code": result.exit_code, "out": result.stdout, "err": result.stderr}

    payload = run_as(user, invoke)
    return Result(payload["code"], payload["out"], payload["err"])
