"""`vmjob profiles` as a subprocess with no daemon, on libvirt's test driver (test:///default:
node0 8 cpus + 2 GiB, node1 8 cpus + 4 GiB) with three emulated NICs (two on node0, one on
node1) and a job held in a real store. The counts are worked out by hand below."""

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
PROFILES = {"2nic": {"cpus": 2, "mem": "512M", "nics": 2, "numa": "strict"},
            "small": {"cpus": 2, "mem": "1G", "numa": "strict"},
            "ci": {"cpus": 1, "pool": "ci"}}


def vmjob(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "VMJOBS_CONFIG": str(config)}
    return subprocess.run([sys.executable, "-m", "vmjobs", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def setup(tmp_path: Path, profiles: object = PROFILES) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "spool": str(tmp_path / "spool"), "socket": str(tmp_path / "no-daemon.sock"),
        "nic_backend": "emulated",
        "hosts": [{"name": "t", "uri": "test:///default", "pool": "boards",
                   "emulated_nics": [{"name": "e0", "node": 0}, {"name": "e1", "node": 0},
                                     {"name": "e2", "node": 1}]}],
        "profiles": profiles}, sort_keys=False))
    return config


def hold(tmp_path: Path, job_id: str, node: int, cpus: tuple[int, ...], mib: int,
         devices: tuple[str, ...] = (), profile: str | None = None) -> None:
    store = Store(tmp_path / "spool" / "state.db")
    alloc = Allocation(host="t", cpus=cpus, memory_mib=mib, devices=devices,
                       nodes=(NodeShare(node=node, cpus=cpus, memory_mib=mib),))
    spec = {"argv": ["true"], "runner": {"pid": 1}, "profile": profile}
    store.add_job(JobRecord(id=job_id, owner="alice", uid=1000, state=JobState.PLACED,
                            spec=spec), Request(cpus=len(cpus), memory_mib=mib), alloc, "run")
    store.transition(job_id, JobState.STARTING)
    store.transition(job_id, JobState.RUNNING)
    store.close()


def counts(config: Path) -> dict[str, int | None]:
    done = vmjob(config, "profiles", "--json")
    assert done.returncode == 0, done.stderr
    return {row["name"]: row["hosts"]["t"] for row in json.loads(done.stdout)}


def test_profiles_count_what_could_start_now(tmp_path: Path) -> None:
    config = setup(tmp_path)
    done = vmjob(config, "profiles", "--json")
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == ["2nic", "small", "ci"]  # the file's order
    assert rows[0] == {"name": "2nic", "cpus": 2, "mem": "512M", "nics": 2, "numa": "strict",
                       "hosts": {"t": 1}}
    # empty host: 2nic needs both NICs of one node: only node0 has two -> 1;
    # small (2 cpus, 1 GiB on one node): node0 2 GiB -> 2, node1 4 GiB -> 4 -> 6;
    # ci: the host is in pool boards, not ci -> 0
    assert counts(config) == {"2nic": 1, "small": 6, "ci": 0}
    # a job on node1 with 1 GiB and cpus 8,9: node1 has 3 GiB left -> small 2 + 3
    hold(tmp_path, "j1", 1, (8, 9), 1024)
    assert counts(config) == {"2nic": 1, "small": 5, "ci": 0}
    # a job on node0 holding NIC e0 and 1536 MiB: no node has two free NICs; node0 has
    # 512 MiB left -> small 0 + 3
    hold(tmp_path, "j2", 0, (0,), 1536, ("emulated:e0",))
    assert counts(config) == {"2nic": 0, "small": 3, "ci": 0}
    text = vmjob(config, "profiles")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["PROFILE", "SPEC", "t"]
    assert lines[1].split()[0] == "2nic" and lines[1].split()[-1] == "0"
    assert "--nics 2" in lines[1] and "--numa strict" in lines[1]
    one = vmjob(config, "profiles", "small", "--json")
    assert [r["name"] for r in json.loads(one.stdout)] == ["small"]


def test_unknown_profile_and_bad_config_are_one_line(tmp_path: Path) -> None:
    config = setup(tmp_path)
    for args in (["profiles", "nope"], ["run", "--profile", "nope", "--", "true"]):
        done = vmjob(config, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "unknown profile 'nope'" in done.stderr
        assert "2nic" in done.stderr  # the known ones are named
    refused = vmjob(config, "profiles", "nope", "--json")
    assert json.loads(refused.stdout)["code"] == "usage"
    for bad, where in (({"x": {"cpus": 0}}, "profiles.x: cpus must be an integer"),
                       ({"x": {"cores": 2}}, "profiles.x: unknown field(s) cores"),
                       ({"x": {"numa": "tight"}}, "profiles.x: numa must be one of"),
                       ({"x": "2 cpus"}, "profiles.x: must be a mapping")):
        done = vmjob(setup(tmp_path, bad), "profiles")
        assert done.returncode == 1, done.stderr  # a bad config file: exit 1, as every key's
        assert done.stderr.count("\n") == 1 and where in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
