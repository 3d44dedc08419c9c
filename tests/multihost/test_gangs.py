"""Gangs on the 3-host dev cluster, through the daemon and the CLI, with real guests (TCG):
members on distinct hosts running their own programs, the exit-code rule, a failed member
stopping the others, a gang waiting for whole hosts without being overtaken by 1-node jobs.
A daemon killed with SIGKILL while a gang runs, and a member migrated, are checked in
test_gang_ctl_daemon.py on the same gangs that also check the gang network across them.

Run under the guest lock with a spool of your own:
    VMJOBS_MULTIHOST_SPOOL=/var/tmp/vmjobs-mh-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python3 -m pytest tests/multihost/test_gangs.py
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import Cluster
from tests.multihost.served import each_test, module_daemon
from tests.multihost.test_moves_daemon import (
    _assert_nothing_held,
    _show,
    _submit,
    _wait_output,
)

# one daemon on the cluster for the module, idle between tests (tests/multihost/served.py):
# every test makes its own gangs and ends them
served = module_daemon("gangs")
daemon = each_test()

def _job_file(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "gang.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _wait(daemon: Daemon, job: str, timeout: float = 240) -> tuple[int, dict[str, Any]]:
    """`vmjob wait JOB --json`: the daemon answers when the gang (or member) has ended."""
    proc = daemon.vmjob("wait", job, "--json", timeout=timeout)
    assert proc.stdout, proc.stderr + daemon.log_text()
    return proc.returncode, json.loads(proc.stdout)


def _lines(daemon: Daemon, job_id: str) -> list[str]:
    out = daemon.vmjob("logs", job_id).stdout
    return [line for line in out.splitlines() if re.fullmatch(r"line \d+", line)]


def test_two_members_on_two_hosts_run_their_own_programs(
        cluster: Cluster, daemon: Daemon, tmp_path: Path) -> None:
    spec = _job_file(tmp_path, {
        "mem": "128M", "on_member_failure": "continue",
        "nodes": [
            {"name": "server", "cmd": ["sh", "-c", "echo server $VMJOB_NODE of $VMJOB_NODES"]},
            {"name": "client", "cmd": ["sh", "-c",
                                       "echo client $VMJOB_NODE of $VMJOB_NODES; exit 3"]},
        ],
    })
    gang = _submit(daemon, "-f", spec)
    assert re.fullmatch(r"[0-9a-f]{8}", gang), gang
    code, view = _wait(daemon, gang)
    # the exit-code rule: the first member that failed (client, 3); the other ran on
    assert code == 3, view
    assert view["gang"] and view["nodes"] == 2 and view["finished"]
    assert (view["state"], view["exit_code"], view["failed_member"]) == ("FAILED", 3,
                                                                         f"{gang}.1")
    members = view["members"]
    assert [m["id"] for m in members] == [f"{gang}.0", f"{gang}.1"]
    assert [(m["state"], m["exit_code"]) for m in members] == [("COMPLETED", 0), ("FAILED", 3)]
    hosts = [m["allocation"]["host"] if m["allocation"] else m["host"] for m in members]
    assert len(set(hosts)) == 2, hosts  # apart by default
    assert view["hosts"] == hosts
    assert "server 0 of 2" in daemon.vmjob("logs", f"{gang}.0").stdout
    assert "client 1 of 2" in daemon.vmjob("logs", f"{gang}.1").stdout
    shown = daemon.vmjob("show", gang).stdout
    assert "2 members" in shown and "exit code  3" in shown
    assert re.search(rf"{gang}\.1\s+FAILED\s+h\d\s+3\s+sh -c", shown), shown
    member = daemon.vmjob("wait", f"{gang}.0")
    assert member.returncode == 0, member.stderr
    listed = daemon.vmjob("list", "--all", "-o", "id,state,exit_code", "--no-header")
    assert [line.split() for line in listed.stdout.splitlines() if gang in line] == [
        [gang, "(gang", "of", "2)", "FAILED", "3"]]
    _assert_nothing_held(daemon)


def test_a_member_exiting_1_stops_the_other_and_the_gang_ends_1(
        cluster: Cluster, daemon: Daemon, tmp_path: Path) -> None:
    spec = _job_file(tmp_path, {
        "mem": "128M",
        "nodes": [
            {"cmd": ["sh", "-c", "echo waiting; sleep 600"]},
            {"cmd": ["sh", "-c", "echo failing; sleep 1; exit 1"]},
        ],
    })
    gang = _submit(daemon, "-f", spec)
    code, view = _wait(daemon, gang)
    assert code == 1, view
    assert (view["state"], view["exit_code"], view["failed_member"]) == ("FAILED", 1,
                                                                         f"{gang}.1")
    first, second = view["members"]
    assert first["state"] == "CANCELLED"
    assert f"gang member {gang}.1 ended FAILED (exit 1)" in first["message"]
    assert (second["state"], second["exit_code"]) == ("FAILED", 1)
    assert "waiting" in daemon.vmjob("logs", f"{gang}.0").stdout
    _assert_nothing_held(daemon)


def test_a_gang_bigger_than_the_free_hosts_waits_and_is_not_overtaken(
        cluster: Cluster, daemon: Daemon) -> None:
    # h1 is taken whole (2 cpus) by a job that ends when told to
    blocker = _submit(daemon, "--host", "h1", "--cpus", "2", "--",
                      "sh", "-c", "echo blocking; sleep 600")
    _wait_output(daemon, blocker, "blocking")
    gang = _submit(daemon, "--nodes", "3", "--cpus", "2", "--", "sh", "-c",
                   "echo node $VMJOB_NODE")
    view = _waiting(daemon, gang)
    assert view["state"] == "QUEUED" and view["position"] == 1, view
    assert "gang of 3" in view["waiting_because"]
    # 1-node jobs that would fit on h2 or h3 now: each would keep the gang from its hosts
    smalls = [_submit(daemon, "--", "echo", f"small {i}") for i in range(3)]
    for small in smalls:
        small_view = _waiting(daemon, small)
        assert small_view["state"] == "QUEUED", small_view
        assert f"would delay {gang}" in small_view["waiting_because"]
    cancelled = daemon.vmjob("cancel", blocker)
    assert cancelled.returncode == 0, cancelled.stderr
    code, view = _wait(daemon, gang)
    assert code == 0, view
    assert sorted(m["host"] for m in view["members"]) == ["h1", "h2", "h3"]
    for index, member in enumerate(view["members"]):
        assert f"node {index}" in daemon.vmjob("logs", member["id"]).stdout
    started = max(_placed_at(m) for m in _show(daemon, gang)["members"])  # with events
    for small in smalls:
        assert _wait(daemon, small)[0] == 0
        assert _placed_at(_show(daemon, small)) >= started  # none went before the gang
    _assert_nothing_held(daemon)


def _waiting(daemon: Daemon, job: str, timeout: float = 30) -> dict[str, Any]:
    """The job's view once a scheduling pass has said why it waits (or it is not queued)."""
    deadline = time.monotonic() + timeout
    while True:
        view = _show(daemon, job)
        if view["state"] != "QUEUED" or view.get("waiting_because"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.1)


def _placed_at(view: dict[str, Any]) -> float:
    return next(e["time"] for e in view["events"] if e["state"] == "PLACED")


def test_run_nodes_prints_each_members_output_and_exits_with_the_gangs_code(
        cluster: Cluster, daemon: Daemon) -> None:
    proc = daemon.vmjob("run", "--nodes", "2", "--mem", "128M", "--on-member-failure",
                        "continue", "--", "sh", "-c", "echo node $VMJOB_NODE; exit $VMJOB_NODE",
                        timeout=240)
    assert proc.returncode == 1, proc.stderr + daemon.log_text()
    assert proc.stdout.splitlines() == ["node 0", "node 1"]
    gang = re.search(r"gang ([0-9a-f]{8}) submitted", proc.stderr)
    assert gang is not None, proc.stderr
    assert re.search(rf"{gang[1]}\.0 on h\d: COMPLETED, exit 0", proc.stderr)
    assert re.search(rf"{gang[1]}\.1 on h\d: FAILED, exit 1", proc.stderr)
    _assert_nothing_held(daemon)


def test_cancel_a_gang_by_its_id(cluster: Cluster, daemon: Daemon) -> None:
    gang = _submit(daemon, "--nodes", "2", "--", "sh", "-c", "echo up; sleep 600")
    for index in range(2):
        _wait_output(daemon, f"{gang}.{index}", "up")
    cancelled = daemon.vmjob("cancel", gang, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert sorted(j["id"] for j in json.loads(cancelled.stdout)["cancelled"]) == [
        f"{gang}.0", f"{gang}.1"]
    code, view = _wait(daemon, gang)
    assert code == 130, view  # cancelled
    assert [m["state"] for m in view["members"]] == ["CANCELLED", "CANCELLED"]
    _assert_nothing_held(daemon)
