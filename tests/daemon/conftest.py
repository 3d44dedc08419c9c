"""Fixtures that run the real daemon (`vmjob serve` as a subprocess) with real guests.

Each daemon gets its own spool directory (its own store, job directories and socket) under
$VMJOBS_TEST_SPOOL; the guest image and package cache are shared between them through
symlinks, so it is built once. Directories are world-traversable: QEMU and the unix users of
the ownership tests must reach them. Run under the guest-test lock:

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-daemon-spool flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/daemon
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from vmjobs.client import Client
from vmjobs.errors import VmjobsError
from vmjobs.transport import Target

ROOT = Path(os.environ.get("VMJOBS_TEST_SPOOL", "/var/tmp/vmjobs-daemon-spool"))
URI = "qemu:///system"
# room for exactly 2 one-vCPU jobs on the local host, whatever the machine's size
ROOM_CPUS = (0, 1)


def our_domains(uri: str = URI) -> list[str]:
    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith("vmjob-")]
    finally:
        conn.close()


def host_entry(name: str = "local", uri: str = URI) -> dict[str, Any]:
    reserved = [c for c in range(os.cpu_count() or 2) if c not in ROOM_CPUS]
    entry: dict[str, Any] = {"name": name, "uri": uri}
    if reserved:
        entry["reserved_cpus"] = ",".join(map(str, reserved))
    return entry


@dataclass
class Daemon:
    """One `vmjob serve` process and the files it owns."""

    name: str
    spool: Path
    config: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmjobs", "--config", str(self.config), "serve",
                 "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.extra_env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.client().status()
                return
            except VmjobsError:
                time.sleep(0.05)
        pytest.fail(f"daemon did not answer within {timeout}s:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM, by pid; guests keep running (the tests then wait for or cancel them)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def client(self) -> Client:
        return Client(Target(self.socket))

    def vmjob(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmjobs", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "vmjobs", "--config", str(self.config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    # --- the store, read directly: the truth the daemon must keep ------------------------

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        db = sqlite3.connect(self.spool / "state.db", timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def reservations(self) -> int:
        return sum(r[0] for r in (
            self.query("SELECT COUNT(*) FROM cpu_reservations")[0],
            self.query("SELECT COUNT(*) FROM device_reservations")[0],
        ))

    def wait_all_ended(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        client = self.client()
        deadline = time.monotonic() + timeout
        views = {}
        for job_id in job_ids:
            left = deadline - time.monotonic()
            assert left > 0, f"jobs still not ended after {timeout}s:\n{self.log_text()}"
            view = client.call("GET", f"/v1/jobs/{job_id}/wait?timeout={left:.1f}",
                               timeout=left + 10)
            assert view["finished"], f"job {job_id} still {view['state']}:\n{self.log_text()}"
            views[job_id] = view
        client.close()
        return views


def write_config(path: Path, spool: Path, socket: Path, hosts: list[dict[str, Any]],
                 **extra: Any) -> Path:
    data = {"spool": str(spool), "virt_type": "qemu", "nic_backend": "emulated",
            "socket": str(socket), "hosts": hosts, **extra}
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def image_root() -> Path:
    """The shared image (built once per machine, content-addressed, reused)."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd is not reachable at {URI} ({exc}); run scripts/start-libvirt.sh")
    ROOT.mkdir(parents=True, exist_ok=True)
    ROOT.chmod(0o755)
    config = write_config(ROOT / "build.yaml", ROOT, ROOT / "unused.sock", [host_entry()])
    built = subprocess.run([sys.executable, "-m", "vmjobs", "--config", str(config), "image",
                            "build"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    return ROOT


@pytest.fixture(scope="session")
def make_daemon(image_root: Path) -> Iterator[Any]:
    """A factory: a daemon with a fresh spool of its own (not started)."""
    made: list[Daemon] = []
    mounted: list[Path] = []  # tmpfs spools

    def make(name: str, hosts: list[dict[str, Any]] | None = None,
             spool_size: str | None = None, **extra: Any) -> Daemon:
        """`spool_size` (e.g. "32m"): the spool is a tmpfs of that size, unmounted at the
        end whatever happens; the daemon's log then lives beside it, not in it."""
        spool = image_root / f"d-{name}"
        if os.path.ismount(spool):  # left by a run that was killed
            subprocess.run(["umount", "-l", str(spool)], check=True)
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(mode=0o755)
        if spool_size is not None:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spool_size},mode=755",
                            "tmpfs", str(spool)], check=True)
            mounted.append(spool)
        spool.chmod(0o755)
        for shared in ("images", "cache"):
            (spool / shared).symlink_to(image_root / shared)
        socket = spool / "vmjobs.sock"
        config = write_config(spool / "config.yaml", spool, socket, hosts or [host_entry()],
                              **extra)
        log = image_root / f"d-{name}.log" if spool_size is not None else spool / "daemon.log"
        daemon = Daemon(name, spool, config, socket, log)
        made.append(daemon)
        return daemon

    try:
        yield make
        for daemon in made:
            daemon.stop()
        _destroy_leftovers(made)
    finally:
        for spool in mounted:
            # lazily: a QEMU that still had a file open must not keep the mount forever
            subprocess.run(["umount", "-l", str(spool)], check=False)


def _destroy_leftovers(made: list[Daemon]) -> None:
    ours = {f"vmjob-{r['id']}" for d in made if (d.spool / "state.db").exists()
            for r in d.query("SELECT id FROM jobs")}
    # a guest whose job just ended goes a moment later (libvirt reaps QEMU ~2 s after the
    # power-off here, longer on a loaded machine: ENVIRONMENT.md): wait for that, bounded;
    # what is still there then was left behind
    deadline = time.monotonic() + 60
    while (leftovers := sorted(set(our_domains()) & ours)) and time.monotonic() < deadline:
        time.sleep(0.2)
    conn = libvirt.open(URI)
    try:
        for name in leftovers:  # never left to confuse the next engineer's tests
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).destroy()
    finally:
        conn.close()
    assert not leftovers, f"tests left domains behind: {leftovers}"


def events(view: dict[str, Any], state: str) -> list[float]:
    return [e["time"] for e in view["events"] if e["state"] == state]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]
