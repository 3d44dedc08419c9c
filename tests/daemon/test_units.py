"""The daemon's pure parts: submissions, ownership, recovery's classification, exit codes, URLs."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from vmjobs.daemon.identity import Caller, caller, denial, in_group, may_act
from vmjobs.daemon.recovery import Found, classify
from vmjobs.daemon.server import ApiError, Router
from vmjobs.errors import VmjobsError
from vmjobs.jobs import JobRecord, JobState
from vmjobs.outcome import exit_code
from vmjobs.transport import Target, parse_url

SOCK = Path("/run/vmjobs/vmjobs.sock")


def record(job_id: str, state: JobState, host: str | None = "a", uid: int = 1000,
           runner: bool = False) -> JobRecord:
    spec: dict[str, object] = {"argv": ["true"]}
    if runner:
        spec["runner"] = {"pid": 1}
    return JobRecord(id=job_id, owner="alice", uid=uid, state=state, spec=spec, host=host)


# --- ownership ------------------------------------------------------------------------------

def test_users_act_on_their_own_jobs_admins_on_all() -> None:
    alice, bob = Caller(1000, "alice", False), Caller(1001, "bob", False)
    admin = Caller(1002, "carol", True)
    job = record("j1", JobState.RUNNING, uid=1000)
    assert may_act(alice, job) and may_act(admin, job)
    assert not may_act(bob, job)
    assert denial(bob, job) == "job j1 belongs to alice; you are bob"


def test_root_is_admin_and_group_membership_is_read_from_the_system() -> None:
    assert caller(0, None).admin
    me = pwd.getpwuid(os.getuid())
    nobody = pwd.getpwnam("nobody")
    assert in_group(nobody.pw_uid, "nogroup")  # primary group counts
    assert not in_group(nobody.pw_uid, "root")
    assert not in_group(me.pw_uid, "no-such-group-here")
    assert not in_group(nobody.pw_uid, None)
    assert not caller(nobody.pw_uid, "root").admin
    assert caller(123456, None).name == "uid 123456"  # no passwd entry: still a caller


# --- recovery -------------------------------------------------------------------------------

def test_classify_keeps_collects_requeues_destroys_and_leaves_strangers_alone() -> None:
    records = [
        record("run", JobState.RUNNING),  # guest still runs: keep
        record("gone", JobState.RUNNING),  # guest gone: collect
        record("placed", JobState.PLACED),  # never got a guest: requeue
        record("starting", JobState.STARTING),  # guest gone while starting: collect
        record("done", JobState.COMPLETED),  # its guest still exists: destroy
        record("other", JobState.RUNNING, host="b"),  # another host: not this pass
        record("direct", JobState.RUNNING, runner=True),  # a direct run: not the daemon's
    ]
    found = {"run": Found("run", True), "done": Found("done", True),
             "stranger": Found("stranger", True), "direct": Found("direct", True)}
    actions = classify("a", records, found)
    assert actions.keep == ["run"]
    assert actions.collect == ["gone", "starting"]
    assert actions.requeue == ["placed"]
    assert actions.destroy == ["done"]
    assert actions.unknown == ["stranger"]


# --- exit codes and URLs --------------------------------------------------------------------

@pytest.mark.parametrize("state, code, expected", [
    ("COMPLETED", 0, 0), ("FAILED", 3, 3), ("TIMEOUT", None, 124), ("CANCELLED", None, 130),
    ("EXPIRED", None, 75), ("LOST", None, 125), ("FAILED", None, 125),
])
def test_exit_codes(state: str, code: int | None, expected: int) -> None:
    assert exit_code({"state": state, "exit_code": code}) == expected


def test_urls() -> None:
    assert parse_url("/tmp/x.sock", SOCK) == Target(Path("/tmp/x.sock"))
    assert parse_url("unix:///tmp/x.sock", SOCK) == Target(Path("/tmp/x.sock"))
    assert parse_url("ssh://alice@head", SOCK) == Target(SOCK, "head", "alice", 22)
    assert parse_url("ssh://head:2222/srv/v.sock", SOCK) == Target(Path("/srv/v.sock"), "head",
                                                                   None, 2222)
    for bad, message in [("http://head", "use unix:///"), ("ssh://", "no host"),
                         ("ssh://head:99999", "bad port")]:
        with pytest.raises(VmjobsError, match=message):
            parse_url(bad, SOCK)


def test_router_names_allowed_methods_and_unknown_paths() -> None:
    router = Router()
    router.add("GET", "/v1/jobs/{id}", lambda req: None)  # type: ignore[arg-type, return-value]
    _handler, params = router.find("GET", "/v1/jobs/3f9a1c2e")
    assert params == {"id": "3f9a1c2e"}
    with pytest.raises(ApiError) as info:
        router.find("DELETE", "/v1/jobs/3f9a1c2e")
    assert info.value.status == 405 and "use GET" in info.value.message
    with pytest.raises(ApiError) as info:
        router.find("GET", "/v1/jobs/a/b")
    assert info.value.status == 404
