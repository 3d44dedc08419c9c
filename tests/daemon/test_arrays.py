"""Job arrays and `vmjob cancel` with filters, through the real daemon and the CLI.

Most tests keep every job queued on a cordoned host (`vmjob drain`), so no guest boots;
`test_array_runs_n_at_once_with_its_index_in_the_guest` boots three real guests (TCG).
Run under the guest lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-daemon-spool flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon/test_arrays.py
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon.conftest import Daemon
from tests.daemon.users import ADMIN_GROUP, as_user, make_users


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("arrays", admin_group=ADMIN_GROUP)
    d.start()
    yield d
    d.stop()


@pytest.fixture
def cordoned(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon's only host cordoned: jobs queue and never start (no guest boots)."""
    drained = daemon.vmjob("drain", "local", "--json")
    assert drained.returncode == 0, drained.stderr
    yield daemon
    cleared = daemon.vmjob("cancel", "--state", "QUEUED")
    assert cleared.returncode == 0, cleared.stderr
    assert daemon.vmjob("uncordon", "local").returncode == 0


def queued_ids(daemon: Daemon) -> set[str]:
    return {r["id"] for r in daemon.query("SELECT id FROM jobs WHERE state = 'QUEUED'")}


def test_array_submit_list_and_cancel_the_whole_array(cordoned: Daemon) -> None:
    d = cordoned
    submitted = d.vmjob("submit", "--array", "1-3,7%2", "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip()
    members = {f"{array}_{i}" for i in (1, 2, 3, 7)}
    assert queued_ids(d) >= members

    listed = json.loads(d.vmjob("list", "--json").stdout)
    views = {v["id"]: v for v in listed if v["id"] in members}
    assert set(views) == members
    assert {v["array"] for v in views.values()} == {array}
    assert sorted(v["array_index"] for v in views.values()) == [1, 2, 3, 7]
    table = d.vmjob("list").stdout
    assert all(m in table for m in members)

    single = d.vmjob("submit", "--", "true").stdout.strip()
    cancelled = d.vmjob("cancel", array, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    answer = json.loads(cancelled.stdout)
    assert {c["id"]: c["state"] for c in answer["cancelled"]} == dict.fromkeys(
        members, "CANCELLED")
    assert answer["errors"] == [] and answer["matched"] == 4
    assert single in queued_ids(d) and not members & queued_ids(d)  # only the array went


def test_bad_arrays_are_refused_with_one_line_and_leave_nothing(daemon: Daemon) -> None:
    before = daemon.query("SELECT COUNT(*) FROM jobs")[0][0]
    for text, line in [("1-1001", "vmjob: --array '1-1001': indices go from 0 to 1000"),
                       ("3-1", "vmjob: --array '3-1': range 3-1 ends before it starts"),
                       ("1-4%0", "vmjob: --array '1-4%0': %N must be from 1")]:
        done = daemon.vmjob("submit", "--array", text, "--", "true")
        assert done.returncode == 2, done
        assert done.stderr.strip().startswith(line), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    client = daemon.client()
    with pytest.raises(Exception, match="array must be text like"):
        client.submit({"argv": ["true"], "array": 5})
    client.close()
    assert daemon.query("SELECT COUNT(*) FROM jobs")[0][0] == before


def test_cancel_filters_users_their_own_admins_anyones(cordoned: Daemon) -> None:
    d = cordoned
    url = f"unix://{d.socket}"
    with make_users(2) as (alice, bob):
        array = as_user(alice, "submit", "--url", url, "--array", "0-2", "--", "true")
        a_single = as_user(alice, "submit", "--url", url, "--", "true")
        b_single = as_user(bob, "submit", "--url", url, "--", "true")
        assert array.code == a_single.code == b_single.code == 0, (array, a_single, b_single)
        a_array, a_id, b_id = array.out.strip(), a_single.out.strip(), b_single.out.strip()
        a_members = {f"{a_array}_{i}" for i in range(3)}

        # bob may not name alice's array, nor filter on her jobs
        denied = as_user(bob, "cancel", "--url", url, a_array)
        assert denied.code == 1
        assert denied.err.strip() == f"vmjob: job {a_array}_0 belongs to {alice.name}; " \
                                     f"you are {bob.name}"
        other = as_user(bob, "cancel", "--url", url, "--user", alice.name)
        assert other.code == 1
        assert other.err.strip() == "vmjob: only administrators may cancel other users' " \
                                    f"jobs; you are {bob.name}"
        # a filter that matches nothing says so and exits 0 (as scancel)
        nothing = as_user(bob, "cancel", "--url", url, "--state", "RUNNING")
        assert (nothing.code, nothing.out.strip()) == (0, "no job matched (nothing cancelled)")
        # bob's --state QUEUED is his own queued jobs only
        mine = as_user(bob, "cancel", "--url", url, "--state", "queued", "--json")
        assert mine.code == 0, mine
        assert [c["id"] for c in json.loads(mine.out)["cancelled"]] == [b_id]
        assert queued_ids(d) >= a_members | {a_id}

        # an admin (the config's group) cancels alice's jobs by user, in one call
        bad = as_user(bob, "cancel", "--url", url, "--state", "DONE")
        assert bad.code == 2 and bad.err.startswith("vmjob: unknown state 'DONE'"), bad
        ended = as_user(bob, "cancel", "--url", url, "--state", "COMPLETED")
        assert ended.code == 2 and "is an end" in ended.err, ended
        subprocess.run(["gpasswd", "-a", bob.name, ADMIN_GROUP], check=True,
                       capture_output=True)
        try:
            admin = as_user(bob, "cancel", "--url", url, "--user", alice.name)
        finally:
            subprocess.run(["gpasswd", "-d", bob.name, ADMIN_GROUP], check=True,
                           capture_output=True)
        assert admin.code == 0, admin
        assert sorted(admin.out.strip().splitlines()) == sorted(
            f"job {j}: CANCELLED" for j in a_members | {a_id})
        assert not queued_ids(d) & (a_members | {a_id})
        # naming jobs that ended, or never existed: one line each, exit 1
        again = d.vmjob("cancel", a_id, "ffffffff")
        assert again.returncode == 1
        assert again.stderr.strip().splitlines() == [
            f"vmjob: job {a_id} already ended: CANCELLED", "vmjob: no job ffffffff"]
    assert d.vmjob("cancel").returncode == 2  # nothing named, no filter: a usage error


def test_array_runs_n_at_once_with_its_index_in_the_guest(daemon: Daemon) -> None:
    """Three real guests, %1: one at a time, each prints its own index; the others wait
    held by the limit meanwhile."""
    submitted = daemon.vmjob(
        "submit", "--array", "4-6%1", "--time-limit", "2m", "--", "sh", "-c",
        'echo "index=$VMJOB_ARRAY_INDEX of $VMJOB_ARRAY_ID"; sleep 2')
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip()
    members = [f"{array}_{i}" for i in (4, 5, 6)]
    client = daemon.client()
    # while one runs, the other two wait for the limit (not for room: 2 cpus are free)
    deadline = time.monotonic() + 120
    held: dict[str, str] = {}
    while time.monotonic() < deadline and len(held) < 2:
        views = {v["id"]: v for v in client.jobs() if v["id"] in members}
        held = {j: v["waiting_because"] for j, v in views.items()
                if v["state"] == "QUEUED" and v["waiting_because"]
                and "held by its array's limit" in v["waiting_because"]}
        if len(held) < 2:
            time.sleep(0.2)
    assert len(held) == 2, (held, daemon.log_text())
    assert all("at most 1 at once (%1)" in why for why in held.values())
    ends = daemon.wait_all_ended(members, timeout=300)
    client.close()
    for index, job in zip((4, 5, 6), members, strict=True):
        assert ends[job]["state"] == "COMPLETED", ends[job]
        assert daemon.vmjob("logs", job).stdout.strip() == f"index={index} of {array}"
    # never two at once: each one's reservation (PLACED) comes after the previous one ended
    spans = []
    for job in members:
        events = daemon.query("SELECT state, time FROM events WHERE job_id = ? ORDER BY id",
                              job)
        placed = next(e["time"] for e in events if e["state"] == "PLACED")
        ended = next(e["time"] for e in events if e["state"] == "COMPLETED")
        spans.append((placed, ended))
    spans.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    # the last one's cores are freed once libvirt has stopped its domain (after the end)
    deadline = time.monotonic() + 60
    while daemon.reservations() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.reservations() == 0
