"""Fixtures for tests that boot real guests under the real libvirtd (TCG here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
import yaml

# Persistent across sessions so downloaded packages and content-addressed images are reused;
# the state store and job directories are wiped per session.
SPOOL = Path(os.environ.get("VMJOBS_TEST_SPOOL", "/var/tmp/vmjobs-test-spool"))
URI = "qemu:///system"


@dataclass(frozen=True)
class Env:
    config: Path
    spool: Path

    def vmjob(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vmjobs", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "vmjobs", "--config", str(self.config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


def our_domains() -> list[str]:
    conn = libvirt.open(URI)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith("vmjob-")]
    finally:
        conn.close()


def write_config(path: Path, spool: Path, **extra: object) -> Path:
    data = {
        "spool": str(spool),
        "virt_type": "qemu",
        "nic_backend": "emulated",
        "hosts": [{
            "name": "local", "uri": URI,
            "emulated_nics": [{"name": "enic0", "node": 0}, {"name": "enic1", "node": 0}],
        }],
    }
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def guest_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd is not reachable at {URI} ({exc}); run scripts/start-libvirt.sh")
    SPOOL.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs", "probe"):
        shutil.rmtree(SPOOL / stale, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (SPOOL / f"state.db{suffix}").unlink(missing_ok=True)
    env = Env(write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", SPOOL), SPOOL)
    built = env.vmjob("image", "build", timeout=900)
    assert built.returncode == 0, built.stderr
    yield env
    leftovers = our_domains()
    assert not leftovers, f"tests left domains behind: {leftovers}"
