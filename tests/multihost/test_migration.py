"""Live migration, checkpoint and restore of jobs on a 3-host dev cluster, with real guests.

Jobs are started with the pieces `vmjob run` uses (tests/multihost/jobs.py) and moved with the
library calls the daemon will expose (vmjobs.migration, vmjobs.checkpoint).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from placement import Request
from tests.multihost import jobs
from tests.multihost.conftest import Cluster
from vmjobs import checkpoint, devcluster, migration
from vmjobs.errors import DoesNotFit
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.store import Store
from vmjobs.virt import domain_xml, replug
from vmjobs.virt.pinning import pinning_of

COUNTER = ["sh", "-c", "i=0; while [ $i -lt 150 ]; do echo line $i; i=$((i+1)); usleep 200000; "
           "done; exit 3"]


def _domain(conn: libvirt.virConnect, job_id: str) -> libvirt.virDomain | None:
    return jobs.lookup_domain(conn, domain_name(job_id))


def test_running_job_migrates_and_finishes_on_destination(cluster: Cluster,
                                                          store: Store) -> None:
    config = cluster.config
    reached = jobs.connect(config)
    try:
        started = jobs.start_job(config, store, reached, COUNTER, "h1")
        jobs.wait_for_line(config.spool, started.job_id, ["h1"], "line 5")
        seen: list[migration.Progress] = []
        moved = migration.migrate_job(config, store, reached.conns, reached.hosts,
                                      started.job_id, "h2", on_progress=seen.append)
        assert moved.destination == "h2"
        # pinning on h2 is h2's reservation, and nothing is held on h1 any more
        dom = _domain(reached.conns["h2"], started.job_id)
        assert dom is not None
        assert pinning_of(dom) == tuple(frozenset({c}) for c in moved.allocation.cpus)
        assert jobs.allocation_of(store, started.job_id) == moved.allocation
        assert started.job_id not in store.reserved_cpus("h1").values()
        assert set(store.reserved_cpus("h2").values()) == {started.job_id}
        assert _domain(reached.conns["h1"], started.job_id) is None
        assert moved.outcome.downtime_ms is not None
        record = jobs.finish(config, store, reached, started.job_id)
        assert record.host == "h2" and record.exit_code == 3
        lines = jobs.job_lines(config.spool, started.job_id)
        assert lines == [f"line {i}" for i in range(150)]
        states = [(e.state, e.host) for e in store.events(started.job_id)]
        assert (JobState.MIGRATING, "h1") in states and (JobState.RUNNING, "h2") in states
        assert store.reservation_count() == 0
    finally:
        jobs.end_all(store, reached)
        reached.close()


NIC_WATCH = ["sh", "-c", "i=0; while [ $i -lt 40 ]; do if [ -e /sys/bus/pci/devices/$NIC0 ]; "
             "then echo nic $i up; else echo nic $i down; fi; i=$((i+1)); usleep 250000; done"]


def test_replug_nics_unplugs_migrates_and_plugs_in_at_the_same_address(cluster: Cluster,
                                                                         store: Store) -> None:
    """--replug-nics on emulated NICs (the stand-in for vfio here): the guest loses its NIC
    during the move and finds the destination's at the same address, so $NIC0 stays valid."""
    config = cluster.config
    reached = jobs.connect(config)
    try:
        started = jobs.start_job(config, store, reached, NIC_WATCH, "h1", nics=1)
        jobs.wait_for_line(config.spool, started.job_id, ["h1"], "nic 3 up")
        moved = migration.migrate_job(config, store, reached.conns, reached.hosts,
                                      started.job_id, "h2", replug_nics=True)
        assert moved.nics == f"NICs {', '.join(moved.allocation.devices)} plugged in"
        assert len(moved.allocation.devices) == 1
        dom = _domain(reached.conns["h2"], started.job_id)
        assert dom is not None
        assert replug.plugged(dom.XMLDesc(0)) == {domain_xml.guest_nic_address(0)}
        # h2's NIC is the job's now, h1's is free
        held = store.db.execute("SELECT host, address FROM device_reservations WHERE job_id = ?",
                                (started.job_id,)).fetchall()
        assert [tuple(r) for r in held] == [("h2", moved.allocation.devices[0])]
        record = jobs.finish(config, store, reached, started.job_id)
        assert record.exit_code == 0
        lines = jobs.job_lines(config.spool, started.job_id)
        assert [line.split()[1] for line in lines] == [str(i) for i in range(40)]
        states = [line.split()[2] for line in lines]
        assert states[0] == "up" and states[-1] == "up", states
        assert "down" in states, states  # it really was unplugged while moving
    finally:
        jobs.end_all(store, reached)
        reached.close()


def test_passthrough_nics_refuse_to_migrate_without_replug(cluster: Cluster,
                                                           store: Store) -> None:
    config = replace(cluster.config, nic_backend="vfio")
    reached = jobs.connect(cluster.config)
    try:
        started = jobs.start_job(cluster.config, store, reached, ["sleep", "60"], "h1", nics=1)
        with pytest.raises(migration.MigrationFailed, match="--replug-nics"):
            migration.migrate_job(config, store, reached.conns, reached.hosts,
                                  started.job_id, "h2")
        record = store.job(started.job_id)
        assert record is not None and record.state == JobState.RUNNING and record.host == "h1"
        assert store.job(migration.placeholder_id(started.job_id)) is None
    finally:
        jobs.end_all(store, reached)
        reached.close()


def _hold(store: Store, job_id: str, host: str, cpus: tuple[int, ...]) -> None:
    """Another job's reservation (no guest needed to take the room)."""
    from placement import Allocation, NodeShare

    alloc = Allocation(host=host, cpus=cpus, memory_mib=128,
                       nodes=(NodeShare(node=0, cpus=cpus, memory_mib=128),))
    with store.reserving():
        store.add_job(JobRecord(id=job_id, owner="root", uid=0, state=JobState.PLACED,
                                spec={}), Request(cpus=len(cpus), memory_mib=128), alloc, "held")


def test_migrating_to_a_full_host_fails_cleanly(cluster: Cluster, store: Store) -> None:
    config = cluster.config
    reached = jobs.connect(config)
    try:
        started = jobs.start_job(config, store, reached, ["sleep", "60"], "h1")
        _hold(store, "fullhost", "h3", (0, 1))
        with pytest.raises(DoesNotFit, match="h3"):
            migration.migrate_job(config, store, reached.conns, reached.hosts,
                                  started.job_id, "h3")
        record = store.job(started.job_id)
        assert record is not None and record.state == JobState.RUNNING and record.host == "h1"
        assert jobs.allocation_of(store, started.job_id) == started.allocation
        assert store.job(migration.placeholder_id(started.job_id)) is None
        dom = _domain(reached.conns["h1"], started.job_id)
        assert dom is not None and dom.isActive()
        assert _domain(reached.conns["h3"], started.job_id) is None
    finally:
        jobs.end_all(store, reached)
        reached.close()


def test_destination_libvirtd_dying_leaves_the_job_on_the_source(cluster: Cluster,
                                                                  store: Store) -> None:
    config = cluster.config
    reached = jobs.connect(config)
    layout = cluster.layout
    killed: list[int] = []
    try:
        started = jobs.start_job(config, store, reached, ["sleep", "120"], "h1",
                                 memory_mib=256)
        jobs.wait_for_line(config.spool, started.job_id, ["h1"], "begin@@")
        lock = threading.Lock()

        def kill_destination(progress: migration.Progress) -> None:
            with lock:
                if killed or progress.memory_processed == 0:
                    return
                pid = devcluster.libvirtd_pid(layout, "h2")
                assert pid is not None
                os.kill(pid, signal.SIGTERM)
                killed.append(pid)

        slow = migration.Policy(bandwidth_mib_s=8)  # ~30 s for 256 MiB: time to kill it
        with pytest.raises(migration.MigrationFailed, match="still running on h1"):
            migration.migrate_job(config, store, reached.conns, reached.hosts, started.job_id,
                                  "h2", policy=slow, on_progress=kill_destination)
        assert killed
        record = store.job(started.job_id)
        assert record is not None and record.state == JobState.RUNNING and record.host == "h1"
        dom = _domain(reached.conns["h1"], started.job_id)
        assert dom is not None and dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert store.job(migration.placeholder_id(started.job_id)) is None
        assert set(store.reservations()) == {started.job_id}
        assert store.reserved_cpus("h2") == {}
    finally:
        if killed:
            devcluster.restart_libvirtd(layout, "h2")
            deadline = time.monotonic() + 30
            while not devcluster.host_status(layout, 2).healthy:
                assert time.monotonic() < deadline, "h2's libvirtd did not come back"
                time.sleep(0.5)
        jobs.end_all(store, reached)
        reached.close()
    # the half-arrived guest on h2 was cleaned up by its libvirtd when it came back
    conn = libvirt.open(layout.uri(2))
    try:
        assert [d.name() for d in conn.listAllDomains()] == []
    finally:
        conn.close()


def _ticks(spool: Path, job_id: str) -> list[int]:
    """The guest's clock in each `t N SECONDS` line since it arrived on h3."""
    text = jobs.output_text(spool, job_id, last_only=True)
    return [int(line.split()[2]) for line in text.splitlines()
            if re.fullmatch(r"t \d+ \d+", line.strip())]


def _watch_ticks(spool: Path, job_id: str, skip: int,
                 timeout_s: float = 20) -> list[tuple[int, float]]:
    """New tick lines after the first `skip`, each with the host's time when it appeared."""
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(seen) < 3:
        ticks = _ticks(spool, job_id)
        now = time.time()
        seen += [(t, now) for t in ticks[skip + len(seen):]]
        time.sleep(0.05)
    return seen


def test_checkpoint_on_h1_restore_on_h3(cluster: Cluster, store: Store) -> None:
    config = cluster.config
    reached = jobs.connect(config)
    try:
        started = jobs.start_job(config, store, reached, [
            "sh", "-c", "i=0; while [ $i -lt 16 ]; do echo t $i $(date +%s); i=$((i+1)); "
            "usleep 500000; done; echo finished > out/result"], "h1")
        jobs.wait_for_line(config.spool, started.job_id, ["h1"], "t 3 ")
        saved = checkpoint.checkpoint_job(config, store, reached.conns, started.job_id)
        assert saved.path.exists() and saved.size_bytes > 0
        record = store.job(started.job_id)
        assert record is not None and record.state == JobState.CHECKPOINTED
        assert store.reservations() == {}
        assert _domain(reached.conns["h1"], started.job_id) is None
        time.sleep(4)  # the guest's clock stands still meanwhile
        restored = checkpoint.restore_job(config, store, reached.conns, reached.hosts,
                                          started.job_id, "h3")
        ticks_at_sync = len(_ticks(config.spool, started.job_id))
        assert restored.host == "h3" and restored.clock.startswith("set")
        dom = _domain(reached.conns["h3"], started.job_id)
        assert dom is not None
        assert pinning_of(dom) == tuple(frozenset({c}) for c in
                                                  restored.allocation.cpus)
        assert not saved.path.exists()
        seen_after = _watch_ticks(config.spool, started.job_id, ticks_at_sync)
        assert seen_after, "no line was printed after the restore"
        record = jobs.finish(config, store, reached, started.job_id)
        assert record.state == JobState.COMPLETED and record.exit_code == 0
        lines = jobs.job_lines(config.spool, started.job_id)
        assert [line.split()[1] for line in lines] == [str(i) for i in range(16)]
        # after the restore the guest's wall clock is the host's, within 1 s: a tick printed
        # after the clock was set carries the host's time of its appearance (ticks printed in
        # the few ms between the resume and the sync may still carry the saved clock)
        first, seen_at = seen_after[0]
        assert abs(first - seen_at) <= 1.5, (first, seen_at)
        out = config.spool / "jobs" / started.job_id / "out" / "result"
        assert out.read_text() == "finished\n"
    finally:
        jobs.end_all(store, reached)
        reached.close()


def test_smoke_migrate_four_rounds(cluster: Cluster) -> None:
    proc = cluster.vmjob("smoke", "migrate", "--from", "h1", "--to", "h2", "--rounds", "4",
                         "--mem", "128M")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line[:1].isdigit() and "ticks" not in line]
    assert len(rows) == 4
    assert proc.stdout.strip().endswith("PASS")
