"""`vmjob pools`: the text it prints (pure), and an unknown pool refused in one line before
anything is connected to or created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vmjobs.cli.pools import format_pool

NOW = 1_800_000_000.0


def test_format_pool_lists_members_holders_and_the_line() -> None:
    view = {
        "name": "ci", "cpus_free": 0, "cpus_total": 4,
        "members": [
            {"host": "h1", "state": "up", "cpus_free": 0, "cpus_total": 2,
             "memory_free_mib": 1024, "memory_total_mib": 2048, "nics_free": 1,
             "nics_total": 2},
            {"host": "h2", "state": "down", "cpus_free": None, "cpus_total": None,
             "memory_free_mib": None, "memory_total_mib": None, "nics_free": None,
             "nics_total": None}],
        "holders": [{"kind": "reservation", "id": "r1", "owner": "carol", "state": "PLACED",
                     "host": "h1", "cpus": 2, "memory_mib": 128, "nics": 1,
                     "since": NOW - 65, "until": NOW + 3600}],
        "queue": [{"id": "j1", "owner": "alice", "position": 1, "held": False,
                   "waiting_because": "first in line for pool ci: h1: 0 free cores",
                   "cpus": 2, "memory_mib": 128, "nics": 0, "host": None, "created": NOW},
                  {"id": "j2", "owner": "bob", "position": None, "held": False,
                   "waiting_because": None, "cpus": 1, "memory_mib": 128, "nics": 0,
                   "host": "h1", "created": NOW}],
    }
    lines = format_pool(view, NOW)
    assert lines[0] == "pool ci: 2 members, 0/4 cores free"
    assert lines[1].split() == ["HOST", "STATE", "CORES", "FREE", "MEMORY", "FREE", "NICS",
                                "FREE"]
    assert lines[2].split() == ["h1", "up", "0/2", "1", "GiB/2", "GiB", "1/2"]
    assert lines[3].split() == ["h2", "down", "-", "-", "-"]
    assert lines[4] == "holders:"
    holder = lines[6].split()
    assert holder[:5] == ["reservation", "r1", "carol", "h1", "2"]
    assert "(1:05 ago)" in lines[6] and "(in 1:00:00)" in lines[6]
    assert lines[7] == "queue:"
    assert lines[9].split()[:4] == ["1", "j1", "alice", "2"]
    assert lines[9].endswith("first in line for pool ci: h1: 0 free cores")
    assert lines[10].split()[:4] == ["-", "j2", "bob", "1"]
    assert lines[10].endswith("waiting for the scheduler")


def test_format_pool_says_when_nothing_holds_or_waits() -> None:
    view = {"name": "lab", "cpus_free": 2, "cpus_total": 2, "holders": [], "queue": [],
            "members": [{"host": "h3", "state": "up", "cpus_free": 2, "cpus_total": 2,
                         "memory_free_mib": 1024, "memory_total_mib": 1024, "nics_free": 0,
                         "nics_total": 0}]}
    assert format_pool(view, NOW)[-2:] == ["holders: none", "queue: empty"]


def test_an_unknown_pool_is_one_line_exit_1_and_touches_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = tmp_path / "config.yaml"
    config.write_text(f"spool: {spool}\nsocket: {tmp_path}/none.sock\nhosts:\n"
                      "  - {name: a, uri: 'qemu+tcp://192.0.2.250/system', pool: [ci, lab]}\n")
    done = subprocess.run([sys.executable, "-m", "vmjobs", "--config", str(config), "pools",
                           "nope", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "vmjob: no pool 'nope' (pools: ci, lab)\n"
    assert json.loads(done.stdout) == {"error": "no pool 'nope' (pools: ci, lab)",
                                       "code": "not_found", "exit_code": 1}
    assert not spool.exists()  # no store created, no host connected to (192.0.2.250)
