"""kill -9 of the daemon at exact instants of a move (fail points, `vmjobs/failpoints.py`), then a
restart: every job ends with exactly one guest, running where the store says, or a complete
checkpoint and no guest; no placeholder, no stray save file, and every line of its output.
Real guests on the 3-host dev cluster (TCG)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.daemon.conftest import Daemon
from tests.multihost import test_moves_daemon as moves
from tests.multihost.conftest import Cluster

daemon = moves.daemon  # the fixture: a daemon of its own per test, on the session's cluster
COUNTER, _domains, _lines, _show = moves.COUNTER, moves._domains, moves._lines, moves._show
_submit, _wait_output, _wait_state = moves._submit, moves._wait_output, moves._wait_state
_assert_nothing_held = moves._assert_nothing_held

LINES = 160  # 40 s of output: the job outlives the kills and restarts


def _kill_at(daemon: Daemon, point: str, *command: str) -> None:
    """Restart the daemon with `point` armed, run `command` (which makes it pass the point),
    and wait for it to die of SIGKILL there; then start it again, unarmed."""
    daemon.stop()
    daemon.extra_env = {"VMJOBS_FAILPOINTS": point}
    daemon.start()
    proc = daemon.vmjob(*command, timeout=300)
    assert proc.returncode != 0, f"{command} succeeded: the daemon never reached {point}"
    assert daemon.proc is not None
    code = daemon.proc.wait(timeout=120)
    assert code == -9, f"daemon exited with {code}, not at {point}:\n{daemon.log_text()}"
    daemon.proc = None
    daemon.extra_env = {}


def _one_copy(cluster: Cluster, daemon: Daemon, job: str) -> str:
    """The job's only guest is running where the store says, holding that host's cores only;
    returns the host."""
    view = _show(daemon, job)
    copies = _domains(cluster, [job])
    assert copies == [(view["host"], f"vmjob-{job}")], (copies, view)
    conn = libvirt.open(cluster.layout.uri(int(view["host"][1:])))
    try:
        assert conn.lookupByName(f"vmjob-{job}").state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
    held = daemon.query("SELECT host, job_id FROM cpu_reservations")
    assert {(r["host"], r["job_id"]) for r in held} == {(view["host"], job)}, \
        [dict(r) for r in held]
    return view["host"]


def _ends_whole(daemon: Daemon, job: str) -> None:
    done = daemon.vmjob("wait", job, timeout=300)
    assert done.returncode == 3, done.stderr + daemon.log_text()
    assert _lines(daemon, job) == [f"line {i}" for i in range(LINES)]
    _assert_nothing_held(daemon)


def _paused_copy(cluster: Cluster, running_on: str, on: str, job: str, scratch: Path) -> None:
    """What a kill in a migration's hand-over leaves: besides the guest running on the
    destination, a paused copy of it on the source (without the shared disk, which the running
    copy holds locked, or its channels, and with a console of its own)."""
    src = libvirt.open(cluster.layout.uri(int(running_on[1:])))
    dst = libvirt.open(cluster.layout.uri(int(on[1:])))
    try:
        root = ET.fromstring(src.lookupByName(f"vmjob-{job}").XMLDesc(0))
        devices = root.find("devices")
        assert devices is not None
        # the shared disk and the output pipe are the running copy's (QEMU would lock the one
        # and reopen the other); a stale paused copy needs neither
        for device in devices.findall("disk") + devices.findall("channel"):
            devices.remove(device)
        for source in root.iter("source"):
            if source.get("path", "").endswith(".log"):
                source.set("path", str(scratch))
        for log in root.iter("log"):
            log.set("file", str(scratch))
        dst.createXML(ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_START_PAUSED)
        assert dst.lookupByName(f"vmjob-{job}").state()[0] == libvirt.VIR_DOMAIN_PAUSED
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("point", ["migrate:reserved", "migrate:copying", "migrate:landed"])
def test_kill9_during_a_migration_leaves_one_running_guest(cluster: Cluster, daemon: Daemon,
                                                           point: str, tmp_path: Path) -> None:
    job = _submit(daemon, "--", "sh", "-c", COUNTER.format(n=LINES))
    source = _wait_state(daemon, job, "RUNNING")["host"]
    _wait_output(daemon, job, "line 2")
    # --bandwidth: long enough a copy for the first progress report to come mid-copy
    _kill_at(daemon, point, "migrate", job, "--bandwidth", "16")
    if point == "migrate:landed":
        destination = next(h for h, _name in _domains(cluster, [job]))
        assert destination != source
        _paused_copy(cluster, destination, source, job, tmp_path / "stale-console.log")
    daemon.start()
    view = _wait_state(daemon, job, "RUNNING", timeout=180)
    host = _one_copy(cluster, daemon, job)
    assert not daemon.query("SELECT id FROM jobs WHERE id LIKE 'mig-%'")
    if point == "migrate:reserved":
        assert host == source
    if point == "migrate:landed":
        assert host != source  # the running copy won; the paused one on the source is gone
        assert any("clock" in (e["reason"] or "") for e in view["events"]
                   if e["state"] == "RUNNING"), view["events"]
    _ends_whole(daemon, job)


def test_kill9_after_a_save_then_after_a_restore(cluster: Cluster, daemon: Daemon) -> None:
    """Killed once the save is complete: CHECKPOINTED with its file, no guest, nothing held.
    Killed once the restored guest runs: RUNNING, the file removed, the clock set."""
    job = _submit(daemon, "--", "sh", "-c", COUNTER.format(n=LINES))
    _wait_state(daemon, job, "RUNNING")
    _wait_output(daemon, job, "line 2")
    save = daemon.spool / "jobs" / job / "checkpoint.save"
    _kill_at(daemon, "checkpoint:saved", "checkpoint", job)
    daemon.start()
    _wait_state(daemon, job, "CHECKPOINTED", timeout=120)
    assert save.exists() and not _domains(cluster, [job])
    _assert_nothing_held(daemon)
    _kill_at(daemon, "restore:restored", "restore", job)
    daemon.start()
    view = _wait_state(daemon, job, "RUNNING", timeout=120)
    _one_copy(cluster, daemon, job)
    assert not save.exists()
    assert any("clock" in (e["reason"] or "") for e in view["events"]), view["events"]
    _ends_whole(daemon, job)


def test_kill9_during_a_save_then_before_a_restore(cluster: Cluster, daemon: Daemon) -> None:
    """Killed while the save runs: libvirt finishes or the restart aborts it — either the job
    runs on with no save file left, or it is CHECKPOINTED with a complete one. Killed after
    the restore is placed but before the guest exists: CHECKPOINTED, file kept, nothing held."""
    job = _submit(daemon, "--", "sh", "-c", COUNTER.format(n=LINES))
    _wait_state(daemon, job, "RUNNING")
    _wait_output(daemon, job, "line 2")
    save = daemon.spool / "jobs" / job / "checkpoint.save"
    _kill_at(daemon, "checkpoint:saving", "checkpoint", job)
    daemon.start()
    deadline_view = _wait_settled(daemon, job)
    if deadline_view == "RUNNING":
        _one_copy(cluster, daemon, job)
        assert not save.exists()
        assert daemon.vmjob("checkpoint", job).returncode == 0
    assert save.exists() and not _domains(cluster, [job])
    _kill_at(daemon, "restore:placed", "restore", job)
    daemon.start()
    _wait_state(daemon, job, "CHECKPOINTED", timeout=120)
    assert save.exists() and not _domains(cluster, [job])
    _assert_nothing_held(daemon)
    restored = daemon.vmjob("restore", job, timeout=180)
    assert restored.returncode == 0, restored.stderr + daemon.log_text()
    _one_copy(cluster, daemon, job)
    assert not save.exists()
    _ends_whole(daemon, job)


def _wait_settled(daemon: Daemon, job: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        state = _show(daemon, job)["state"]
        if state in ("RUNNING", "CHECKPOINTED"):
            return state
        assert time.monotonic() < deadline, f"{job} is {state}:\n{daemon.log_text()}"
        time.sleep(0.3)
