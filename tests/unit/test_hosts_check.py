"""`vmjob --config F hosts --check`: validates a config without connecting to or creating
anything (the Ansible controller role checks its template with it before installing it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIG = """\
spool: {spool}
socket: {spool}/vmjobs.sock
hosts:
  - {{name: node1, uri: "qemu+tcp://192.0.2.250/system", reserved_cpus: "0,1",
     pool: batch, labels: {{rack: a}}, nics: ["8086:1572", "0000:03:00.1"]}}
  - {{name: node2, uri: "qemu+tcp://192.0.2.251/system"}}
"""


def vmjob(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmjobs", *args], capture_output=True,
                          text=True, timeout=60)


def test_valid_config_is_listed_and_nothing_is_touched(tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # hosts that do not exist: --check must not connect
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(spool=spool))
    done = vmjob("--config", str(config), "hosts", "--check", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [h["name"] for h in data["hosts"]] == ["node1", "node2"]
    assert data["hosts"][0] == {"name": "node1", "uri": "qemu+tcp://192.0.2.250/system",
                                "pools": ["batch"], "reserved_cpus": [0, 1],
                                "labels": {"rack": "a"}, "nics": ["8086:1572", "0000:03:00.1"]}
    text = vmjob("--config", str(config), "hosts", "--check")
    assert text.returncode == 0 and "valid" in text.stdout and "node2" in text.stdout
    assert not spool.exists()


def test_invalid_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(spool=tmp_path / "spool").replace('"0,1"', '"0-x"'))
    done = vmjob("--config", str(config), "hosts", "--check")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "hosts[0].reserved_cpus" in done.stderr
    assert done.stdout == ""
