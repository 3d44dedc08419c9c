"""Messages a new user met trying the docs, through a real daemon on libvirt's test driver
(no guest, no guest lock): each is one line on stderr with the documented exit code."""

from __future__ import annotations

import selectors
import time
from typing import Any

import pytest

HOST = {"name": "t", "uri": "test:///default", "reserved_cpus": "2-15"}  # cpus 0-1 usable
PROFILES = {"2nic": {"cpus": 2, "mem": "512M"}, "ci": {"cpus": 1, "mem": "256M"}}


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Any:
    d = make_daemon("cli-msgs-td", hosts=[HOST], profiles=PROFILES)
    d.start()
    yield d
    d.stop()


def test_wait_timeout_of_bare_seconds_says_seconds(daemon: Any) -> None:
    client = daemon.client()
    job = client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})["id"]
    deadline = time.monotonic() + 60
    while client.job(job)["state"] != "RUNNING":  # the test driver's domain never ends
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    done = daemon.vmjob("wait", job, "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert done.stderr == f"vmjob: job {job} has not ended after 1s (RUNNING)\n"
    done = daemon.vmjob("wait", job, "--timeout", "1s")
    assert done.stderr == f"vmjob: job {job} has not ended after 1s (RUNNING)\n"
    client.cancel(job)
    client.close()


def test_an_unknown_profile_at_the_daemon_names_the_known_ones(daemon: Any) -> None:
    done = daemon.vmjob("profiles", "nope")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "unknown profile 'nope'" in done.stderr and "(profiles: 2nic, ci)" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("args", "what"), [
    (("show", ""), "job id"), (("logs", " "), "job id"), (("wait", ""), "job id"),
    (("migrate", ""), "job id"), (("kv", "", "get", "k"), "job id"),
    (("release", ""), "reservation id"), (("drain", ""), "host name")])
def test_an_empty_id_is_a_usage_error_not_an_unknown_endpoint(
        daemon: Any, args: tuple[str, ...], what: str) -> None:
    # it was "no such endpoint: /v1/jobs/ (see docs/api.md)", exit 1: the empty id made the
    # path name the job list
    done = daemon.vmjob(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"vmjob: give a {what} (an empty string names none)\n"


def test_attach_to_an_ended_job_exits_1_as_other_commands_on_one_do(daemon: Any) -> None:
    # exit 2 is for usage errors (docs/user-guide.md, "Exit codes"); an ended job is the
    # job's state, which `migrate` or `cancel` of one answer with 1
    client = daemon.client()
    job = client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})["id"]
    client.cancel(job)
    client.close()
    done = daemon.vmjob("attach", job)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"vmjob: job {job} has ended (CANCELLED); see 'vmjob logs {job}'\n"
    assert daemon.vmjob("migrate", job).returncode == 1


def test_logs_follow_of_a_queued_job_says_where_it_waits(daemon: Any) -> None:
    # `logs -f` of a job still in the queue printed nothing until it started: a hang, to the
    # user. Now one line on stderr says where and why it waits.
    client = daemon.client()
    hold = daemon.vmjob("reserve", "--cpus", "2", "--duration", "5m")
    assert hold.returncode == 0, hold.stderr
    job = client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})["id"]
    deadline = time.monotonic() + 60
    while client.job(job).get("position") is None:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    follow = daemon.popen("logs", "-f", job)
    try:
        assert follow.stderr is not None
        with selectors.DefaultSelector() as sel:  # the pipe, bounded: the line comes first
            sel.register(follow.stderr, selectors.EVENT_READ)
            assert sel.select(60), "logs -f said nothing about the queued job"
        line = follow.stderr.readline()
        assert line.startswith(f"vmjob: job {job} is queued at position 1"), line
        assert "0 free cores" in line and line.endswith("its output follows once it starts\n")
    finally:
        client.cancel(job)
        out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert out == "" and err == ""
    assert daemon.vmjob("release", hold.stdout.strip()).returncode == 0
    client.close()
