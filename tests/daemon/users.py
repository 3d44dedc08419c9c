"""Real unix users for the ownership tests, and running the CLI as one of them.

The CLI runs in a forked child that has dropped to the user's uid and groups, so the daemon
sees that uid through SO_PEERCRED exactly as it would for the user's own shell. (Our Python
lives under /root here, which other users cannot execute; forking avoids needing another.)
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


def as_user(user: User, *args: str) -> Result:
    """`vmjob ARGS...` as `user`: exit code, stdout, stderr."""
    from vmjobs.cli import cli

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run the CLI, report, never return
        code = 99
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(user.name, user.gid))
            os.setgid(user.gid)
            os.setuid(user.uid)
            os.environ["HOME"] = "/"
            os.environ.pop("VMJOBS_URL", None)
            result = CliRunner().invoke(cli, list(args))
            payload = {"code": result.exit_code, "out": result.stdout, "err": result.stderr}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(payload, pipe)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"child failed: {args}"
    payload = json.loads(data)
    return Result(payload["code"], payload["out"], payload["err"])
