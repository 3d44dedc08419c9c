"""`vmjob plan rebalance` on saved snapshots (no libvirt needed) and `vmjob plan snapshot` of a
cluster read through libvirt's test driver plus a real store: the real CLI, as a subprocess."""

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


def vmjob(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if config is not None:
        env["VMJOBS_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "vmjobs", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


SNAPSHOT = {
    # a/0: 8 cpus, a 4-cpu and a 1-cpu job -> 3 free (remainder 3 for S=4);
    # b/0: 8 cpus, a 6-cpu job -> 2 free (remainder 2). Moving "one" into b/0 completes a
    # 4-cpu slot on a/0: Σ remainders 5 -> 1 over 5 free cpus.
    "hosts": [{"name": "a", "nodes": [{"id": 0, "cpus": 8, "memory_mib": 4096}]},
              {"name": "b", "nodes": [{"id": 0, "cpus": 8, "memory_mib": 4096}]}],
    "jobs": [{"id": "big", "host": "a", "nodes": [{"node": 0, "cpus": 4, "memory_mib": 400}]},
             {"id": "one", "host": "a", "nodes": [{"node": 0, "cpus": 1, "memory_mib": 100}]},
             {"id": "six", "host": "b", "nodes": [{"node": 0, "cpus": 6, "memory_mib": 600}]}],
}


def test_plan_rebalance_fragments_json(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(SNAPSHOT))
    done = vmjob("plan", "rebalance", "--snapshot", str(path), "--max-moves", "3",
                 "--objective", "fragments", "--target-cpus", "4", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["moves"] == [{"job": "one", "from_host": "a", "to_host": "b",
                             "to_nodes": [{"node": 0, "cpus": 1, "memory_mib": 100}]}]
    assert out["before"] == 1.0 and out["after"] == 0.2
    text = vmjob("plan", "rebalance", "--snapshot", str(path), "--max-moves", "3",
                 "--objective", "fragments", "--target-cpus", "4")
    assert text.stdout.splitlines() == [
        "fragment rate for 4-cpu jobs: 1.000 -> 0.200 with 1 move(s)",
        "  one: a -> b node 0"]


def test_plan_rebalance_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hosts": [{"name": "a", "nodes": [{"id": 0, "cpus": -1}]}]}')
    cases = [
        # A missing file is a usage error (exit 2), like `vmjob inventory`'s.
        ((str(tmp_path / "missing.json"),), 2,
         f"vmjob: Invalid value for '--snapshot': File '{tmp_path / 'missing.json'}' does not "
         "exist. (see 'vmjob plan rebalance --help')"),
        ((str(bad),), 1, f"vmjob: {bad}: hosts[0].nodes[0].cpus must be a whole number >= 0"),
        ((str(bad), "--target-cpus", "0"), 2, None),
    ]
    for args, code, message in cases:
        done = vmjob("plan", "rebalance", "--snapshot", *args)
        assert done.returncode == code
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
        if message is not None:
            assert done.stderr.strip() == message


def test_plan_rebalance_whole_nodes_text_counts_nodes(tmp_path: Path) -> None:
    """The whole-nodes figure is a count of nodes: printed "1 -> 2", not "1.000 -> 2.000"."""
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(SNAPSHOT))
    done = vmjob("plan", "rebalance", "--snapshot", str(path), "--max-moves", "3")
    assert done.returncode == 0, done.stderr
    # No node is whole-free before; whatever the plan, both figures are whole numbers.
    first = done.stdout.splitlines()[0]
    assert first.startswith("whole free NUMA nodes: 0 -> "), first
    assert "." not in first.split(":")[1].split("with")[0], first


def test_plan_snapshot_to_an_unwritable_file_is_one_line(tmp_path: Path) -> None:
    """`-o` into a missing directory: one line on stderr, exit 1, no traceback."""
    config = tmp_path / "config.yaml"
    spool = tmp_path / "spool"
    spool.mkdir()
    config.write_text(yaml.safe_dump({"spool": str(spool), "virt_type": "qemu",
                                      "hosts": [{"name": "t", "uri": "test:///default"}]}))
    target = tmp_path / "no-such-dir" / "snap.json"
    done = vmjob("plan", "snapshot", "-o", str(target), config=config)
    assert done.returncode == 1
    assert done.stderr.strip() == f"vmjob: cannot write {target}: No such file or directory"
    assert not target.parent.exists()


def test_plan_snapshot_of_the_live_cluster(tmp_path: Path) -> None:
    """test:///default has 2 NUMA cells of 8 cpus (its canned capabilities); one job held in
    the store on cell 1 shows up with its cpus and memory, and the snapshot plans again."""
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"spool": str(spool), "virt_type": "qemu",
                                      "hosts": [{"name": "t", "uri": "test:///default"}]}))
    store = Store(spool / "state.db")
    alloc = Allocation("t", (8, 9), 256, (NodeShare(1, (8, 9), 256),))
    store.add_job(JobRecord(id="j1", owner="root", uid=0, state=JobState.PLACED,
                            spec={"argv": ["true"]}), Request(2, 256), alloc, "test")
    for state in (JobState.STARTING, JobState.RUNNING):  # the state machine's way
        store.transition("j1", state, "test")
    # j2 names its host: the live planner never moves it, so neither may an offline plan.
    store.add_job(JobRecord(id="j2", owner="root", uid=0, state=JobState.PLACED,
                            spec={"argv": ["true"]}), Request(1, 128, host="t"),
                  Allocation("t", (10,), 128, (NodeShare(1, (10,), 128),)), "test")
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition("j2", state, "test")
    store.close()
    done = vmjob("plan", "snapshot", "-o", str(tmp_path / "snap.json"), config=config)
    assert done.returncode == 0, done.stderr
    snap = json.loads((tmp_path / "snap.json").read_text())
    assert [(h["name"], [(n["id"], n["cpus"]) for n in h["nodes"]]) for h in snap["hosts"]] \
        == [("t", [(0, 8), (1, 8)])]
    assert snap["jobs"] == [{"id": "j1", "host": "t",
                             "nodes": [{"node": 1, "cpus": 2, "memory_mib": 256}]},
                            {"id": "j2", "host": "t",
                             "nodes": [{"node": 1, "cpus": 1, "memory_mib": 128}],
                             "movable": False}]
    again = vmjob("plan", "rebalance", "--snapshot", str(tmp_path / "snap.json"), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["before"] == 1.0  # node 0 is whole-free
