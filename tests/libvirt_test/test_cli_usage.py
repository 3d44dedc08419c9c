"""`vmjob usage` as a subprocess with no daemon: figures computed from a real store (events
written through its API) and the capacity of libvirt's test driver (test:///default: 2 nodes
of 8 cpus)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from placement import Allocation, NodeShare, Request
from vmjobs.jobs import JobRecord, JobState
from vmjobs.store import Store

ROOT = Path(__file__).resolve().parents[2]


def vmjob(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "VMJOBS_CONFIG": str(config)}
    return subprocess.run([sys.executable, "-m", "vmjobs", "usage", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def setup(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "spool": str(tmp_path / "spool"), "socket": str(tmp_path / "no-daemon.sock"),
        "hosts": [{"name": "t", "uri": "test:///default", "pool": ["boards", "lab"]}],
        "profiles": {"pair": {"cpus": 2, "numa": "strict"},
                     "huge": {"cpus": 8, "mem": "3G", "numa": "strict"}}}, sort_keys=False))
    store = Store(tmp_path / "spool" / "state.db")
    cpus = (8, 9)  # on node 1
    alloc = Allocation(host="t", cpus=cpus, memory_mib=256,
                       nodes=(NodeShare(node=1, cpus=cpus, memory_mib=256),))
    record = JobRecord(id="j1", owner="alice", uid=1000, state=JobState.PLACED,
                       spec={"argv": ["true"], "runner": {"pid": 1}, "profile": "pair"})
    store.add_job(record, Request(cpus=2, memory_mib=256), alloc, "direct run")
    store.transition("j1", JobState.STARTING)
    store.transition("j1", JobState.RUNNING)
    store.close()
    return config


def test_usage_json_from_the_store_without_a_daemon(tmp_path: Path) -> None:
    config = setup(tmp_path)
    done = vmjob(config, "--by", "node", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["by"] == "node" and data["windows"] == {"1m": 60, "1h": 3600, "24h": 86400}
    rows = {(r["host"], r["node"]): r for r in data["rows"]}
    assert set(rows) == {("t", 0), ("t", 1)}
    assert (rows[("t", 1)]["held_now"], rows[("t", 1)]["usable_cores"]) == (2, 8)
    assert rows[("t", 0)]["held_now"] == 0 and rows[("t", 0)]["load"]["1h"] == 0.0
    assert 0 < rows[("t", 1)]["load"]["1m"] <= 2 / 8  # held for part of the last minute
    hosts = json.loads(vmjob(config, "--json").stdout)["rows"]
    assert [(r["host"], r["held_now"], r["usable_cores"]) for r in hosts] == [("t", 2, 16)]
    users = json.loads(vmjob(config, "--by", "user", "--json").stdout)["rows"]
    assert [(u["user"], u["jobs"], u["started"]) for u in users] == [("alice", 1, 1)]
    assert users[0]["core_hours"] > 0 and users[0]["wait_mean_s"] >= 0
    text = vmjob(config, "--by", "user")
    assert text.stdout.splitlines()[0].split() == ["USER", "JOBS", "CORE-HOURS", "STARTED",
                                                   "WAIT", "MEAN", "WAIT", "P95"]
    assert text.stdout.splitlines()[1].startswith("alice")


def test_usage_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    config = setup(tmp_path)
    for args in (["--since", "5x"], ["--since", "0"], ["--by", "rack"], ["--since", "400d"]):
        done = vmjob(config, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_usage_by_pool_and_profile_from_the_store(tmp_path: Path) -> None:
    config = setup(tmp_path)  # j1 (profile pair) holds 2 of node1's cpus since just now
    done = vmjob(config, "--by", "pool", "--json")
    assert done.returncode == 0, done.stderr
    # a host in two pools counts in both
    rows = json.loads(done.stdout)["rows"]
    assert [(p["pool"], p["hosts"], p["held_now"], p["usable_cores"], p["jobs"])
            for p in rows] == [("boards", ["t"], 2, 16, 1), ("lab", ["t"], 2, 16, 1)]
    rows = {r["profile"]: r for r in json.loads(vmjob(config, "--by", "profile",
                                                      "--json").stdout)["rows"]}
    assert list(rows) == ["pair", "huge"]
    assert (rows["pair"]["held_now"], rows["pair"]["jobs"], rows["pair"]["usable_cores"]) \
        == (2, 1, 16)
    # a pair (2 cpus on one node) fitted all along; huge (8 cpus + 3 GiB on one node) only
    # fits node1 (4 GiB), whose 8 cpus j1 now shares: it could start until j1 did
    assert rows["pair"]["could_start"] == {"1m": 1.0, "1h": 1.0, "24h": 1.0}
    assert 0.0 < rows["huge"]["could_start"]["24h"] < 1.0
    assert (rows["huge"]["held_now"], rows["huge"]["jobs"]) == (0, 0)
    text = vmjob(config, "--by", "profile").stdout.splitlines()
    assert text[0].split()[:4] == ["PROFILE", "HELD/USABLE", "JOBS", "LOAD"]
    assert "FREE" in text[0] and text[1].split()[:3] == ["pair", "2/16", "1"]
