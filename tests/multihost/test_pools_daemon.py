"""Pools through the daemon on the 3-host dev cluster, with real guests (TCG): h1 and h2 form
the pool `ci`, h3 is in `other`; every host has 2 cpus, so a `--cpus 2` job fills one.

Orders are read from the store's events as `vmjob show --json` gives them (the time each job
was placed: the queue's decision), never from sleeps; waits are the daemon's long polls.
Guests are small (128 MiB) and short (`true`), or cancelled as soon as they served.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import Cluster
from tests.multihost.served import each_test, module_daemon
from tests.multihost.test_moves_daemon import _assert_nothing_held, _show, _wait_state

POOLS = {"h1": "ci", "h2": "ci", "h3": "other"}


def _pooled(cluster: Cluster) -> dict[str, Any]:
    hosts = yaml.safe_load(cluster.config_path.read_text())["hosts"]
    for host in hosts:
        host["pool"] = POOLS[host["name"]]
    return {"hosts": hosts}


# one daemon for the module, idle between tests (tests/multihost/served.py: what a test left
# queued or running is cancelled after it, and a guest left behind fails it)
served = module_daemon("pools", _pooled)
daemon = each_test()


def _submit(daemon: Daemon, *args: str) -> str:
    proc = daemon.vmjob("submit", "--mem", "128M", "--cpus", "2", *args)
    assert proc.returncode == 0, proc.stderr + daemon.log_text()
    return proc.stdout.strip()


def _placed_at(view: dict[str, Any]) -> float:
    """When the queue placed the job (its PLACED event), on the daemon's clock."""
    times = [e["time"] for e in view["events"] if e["state"] == "PLACED" and not e["note"]]
    assert len(times) == 1, view["events"]
    return float(times[0])


def _pool(daemon: Daemon, name: str) -> dict[str, Any]:
    proc = daemon.vmjob("pools", name, "--json")
    assert proc.returncode == 0, proc.stderr + daemon.log_text()
    return json.loads(proc.stdout)


def _pool_after_a_pass(daemon: Daemon, name: str, timeout: float = 60) -> dict[str, Any]:
    """The pool once every job in its queue has been through a scheduling pass (a job just
    submitted has no position until the scheduler, woken by the submit, has looked at it)."""
    deadline = time.monotonic() + timeout
    while True:
        view = _pool(daemon, name)
        if all(q["position"] is not None for q in view["queue"]):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.2)


def test_six_jobs_for_a_two_host_pool_start_in_submit_order(cluster: Cluster,
                                                            daemon: Daemon) -> None:
    jobs = [_submit(daemon, "--pool", "ci", "--", "true") for _ in range(6)]
    # whatever is still queued now waits in ci's line in submit order, positions from 1
    line = _pool(daemon, "ci")["queue"]
    queued = [q["id"] for q in line]
    assert queued == [j for j in jobs if j in queued]
    known = [q["position"] for q in line if q["position"] is not None]
    assert known == list(range(1, len(known) + 1))
    ended = daemon.wait_all_ended(jobs, timeout=600)
    assert all(v["state"] == "COMPLETED" for v in ended.values()), ended
    views = [_show(daemon, j) for j in jobs]
    placed = [_placed_at(v) for v in views]
    assert placed == sorted(placed), list(zip(jobs, placed, strict=True))
    assert {v["host"] for v in views} <= {"h1", "h2"}  # never on h3: not in ci
    # each host held one at a time: the third job was placed only after one of the first
    # two ended, and so on (each host fits one)
    ends = [max(e["time"] for e in v["events"] if e["state"] == "COMPLETED") for v in views]
    for k in range(2, 6):
        assert placed[k] >= min(sorted(ends[:k])[k - 2:]), (k, placed, ends)
    _assert_nothing_held(daemon)


def test_a_job_pinned_to_a_member_is_not_overtaken_and_pools_shows_the_holders(
        cluster: Cluster, daemon: Daemon) -> None:
    # both members busy, until cancelled
    b1 = _submit(daemon, "--host", "h1", "--time-limit", "10m", "--", "sleep", "600")
    b2 = _submit(daemon, "--host", "h2", "--", "sleep", "600")
    _wait_state(daemon, b1, "RUNNING")
    _wait_state(daemon, b2, "RUNNING")
    pinned = _submit(daemon, "--host", "h1", "--", "true")  # in h1's pools' line: ci
    later = _submit(daemon, "--pool", "ci", "--", "true")
    view = _pool_after_a_pass(daemon, "ci")
    assert [m["host"] for m in view["members"]] == ["h1", "h2"]
    assert [(m["cpus_free"], m["cpus_total"]) for m in view["members"]] == [(0, 2), (0, 2)]
    holders = {h["id"]: h for h in view["holders"]}
    assert set(holders) == {b1, b2}
    assert {h["kind"] for h in holders.values()} == {"job"}
    assert (holders[b1]["host"], holders[b1]["cpus"], holders[b1]["owner"]) == ("h1", 2, "root")
    assert holders[b1]["until"] == pytest.approx(holders[b1]["since"] + 600, abs=1)
    assert holders[b2]["until"] is None
    queue = [(q["id"], q["position"]) for q in view["queue"]]
    assert queue == [(pinned, 1), (later, 2)], view["queue"]
    assert view["queue"][0]["waiting_because"].startswith("first in line for pool ci: ")
    shown = daemon.vmjob("pools", "ci")
    assert shown.returncode == 0 and b1 in shown.stdout and later in shown.stdout
    # h1 frees first: the pinned job takes it, the later pool job does not
    assert daemon.vmjob("cancel", b1).returncode == 0
    ended = daemon.wait_all_ended([pinned, later], timeout=300)
    assert ended[pinned]["state"] == ended[later]["state"] == "COMPLETED", ended
    first, second = _show(daemon, pinned), _show(daemon, later)
    assert first["host"] == "h1"
    assert _placed_at(first) < _placed_at(second)
    assert daemon.vmjob("cancel", b2).returncode == 0
    _assert_nothing_held(daemon)
    unknown = daemon.vmjob("pools", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "vmjob: no pool 'nope' (pools: ci, other)"
