"""A 3-host dev cluster for the whole session, always torn down, with a persistent spool.

Run these under the guest lock, as every test that boots guests on this machine:
    flock /tmp/vmjobs-guest.lock python3 -m pytest tests/multihost
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmjobs import devcluster
from vmjobs.config import Config, load
from vmjobs.store import Store

NAME = "mh"
SUBNET = "10.231.1.0/24"
SPOOL = Path(os.environ.get("VMJOBS_MULTIHOST_SPOOL", "/var/tmp/vmjobs-multihost-spool"))


@dataclass(frozen=True)
class Cluster:
    layout: devcluster.Layout
    config_path: Path

    @property
    def config(self) -> Config:
        return load(str(self.config_path))

    def vmjob(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmjobs", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout,
        )


def leftovers(name: str) -> list[str]:
    """Everything a dev cluster named `name` could leave behind on the machine."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines()
              if line.startswith(f"vmj-{name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
              if f"vh-{name}-" in line or f"vmjbr-{name}" in line]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines()
              if f"vmj-{name}-" in line or f"/devcluster/{name}/" in line]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"/devcluster/{name}/" in cmdline or f"vmj-{name}-" in cmdline:
                found.append(f"process {proc.name}: {cmdline[:80]}")
    cgroups = Path("/sys/fs/cgroup")
    found += [f"cgroup {p}" for p in cgroups.glob(f"*/vmjobs-devcluster-{name}-*")]
    return found


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root")
    devcluster.down(NAME)
    SPOOL.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs", "smoke", "locks"):
        shutil.rmtree(SPOOL / stale, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (SPOOL / f"state.db{suffix}").unlink(missing_ok=True)
    try:
        state = devcluster.up(NAME, 3, SUBNET, SPOOL)
        env = Cluster(state.layout, state.layout.config_path)
        built = env.vmjob("image", "build", timeout=900)
        assert built.returncode == 0, built.stderr
        yield env
    finally:
        devcluster.down(NAME)
    left = leftovers(NAME)
    assert not left, f"devcluster down left: {left}"


@pytest.fixture()
def store(cluster: Cluster) -> Iterator[Store]:
    opened = Store(cluster.config.state_db)
    yield opened
    opened.close()
