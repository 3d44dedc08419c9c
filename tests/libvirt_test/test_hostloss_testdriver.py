"""Lost-host policies and periodic checkpoints against libvirt's test driver (a host whose
guests are test-driver domains carrying our <metadata>): what each policy does to the store
(state, event, reservation released in the same transaction, spec marks) and to the job's
files, and a periodic checkpoint that fails."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from tests.libvirt_test.test_recovery_moves import add, alloc, daemon, guests, run_guest
from vmjobs.checkpoint import CheckpointFailed, Periodic, periodic_checkpoint, save_path
from vmjobs.daemon.core import Active, Daemon, Phase
from vmjobs.daemon.hostloss import Checkpointer, settle_lost
from vmjobs.guest import JobFiles
from vmjobs.jobs import JobState

__all__ = ["daemon", "guests"]  # fixtures


def _unreachable(served: Daemon, job_id: str, cpu: int, **spec: object) -> None:
    add(served, job_id, JobState.UNREACHABLE, alloc("a", cpu), **spec)
    served.admit(Active(job_id, "a", None, phase=Phase.RUNNING))
    JobFiles.of(served.config.spool, job_id).dir.mkdir(parents=True, exist_ok=True)


def _lose(served: Daemon, job_id: str) -> None:
    record = served.store.job(job_id)
    assert record is not None
    with served.lock:
        settle_lost(served, record, "host a lost: test")


def test_each_policy_on_a_lost_host(daemon: Daemon) -> None:  # noqa: F811
    spool = daemon.config.spool
    _unreachable(daemon, "fail", 0)
    _unreachable(daemon, "again", 1, on_host_loss="requeue")
    _unreachable(daemon, "nockpt", 2, on_host_loss="restore", checkpoint_every=60)
    taken = Periodic(2, "periodic.2.save", time.time() - 30, 0, 7, 100.0)
    _unreachable(daemon, "resume", 3, on_host_loss="restore", checkpoint_every=60,
                 checkpoint=taken.to_dict())
    files = JobFiles.of(spool, "resume")
    (files.dir / "periodic.2.save").write_bytes(b"saved state")
    files.output(0).write_bytes(b"tick 0\ntick 1\n")
    assert daemon.store.reservation_count() == 4

    for job_id in ("fail", "again", "nockpt", "resume"):
        _lose(daemon, job_id)

    store = daemon.store
    states = {j: store.job(j).state for j in ("fail", "again", "nockpt", "resume")}  # type: ignore[union-attr]
    assert states == {"fail": JobState.LOST, "again": JobState.QUEUED,
                      "nockpt": JobState.QUEUED, "resume": JobState.CHECKPOINTED}
    assert store.reservation_count() == 0 and not daemon.active
    # the same job, with its history: its last event says why
    again = store.events("again")[-1]
    assert again.state == JobState.QUEUED and "--on-host-loss requeue" in again.reason
    assert "no checkpoint yet" in store.events("nockpt")[-1].reason
    resumed = store.job("resume")
    assert resumed is not None
    assert resumed.spec["restore"] == "auto" and resumed.spec["time_left_s"] == 100.0
    assert "checkpoint" not in resumed.spec
    assert save_path(spool, "resume").read_bytes() == b"saved state"
    assert "restoring from periodic checkpoint 2" in store.events("resume")[-1].reason
    # its output up to the checkpoint stays; the rest is set aside, vmjob's line follows
    assert files.output(0).read_bytes() == b"tick 0\n"
    assert (files.dir / "lost.0.out").read_bytes() == b"tick 1\n"
    assert b"restored from its checkpoint" in files.output(1).read_bytes()
    # the requeued jobs' lines say they run again
    for job_id in ("again", "nockpt"):
        text = JobFiles.of(spool, job_id).output(0).read_text()
        assert "the job runs again from the start" in text, text


def test_a_failed_periodic_checkpoint_keeps_the_previous_one_and_the_guest_running(
        daemon: Daemon, guests: list[str]) -> None:  # noqa: F811
    # the test driver refuses snapshots without metadata: a checkpoint that fails
    previous = Periodic(1, "periodic.1.save", 1.0, 0, 0, None)
    add(daemon, "ck", JobState.RUNNING, alloc("a", 0), on_host_loss="restore",
        checkpoint_every=60, checkpoint=previous.to_dict())
    run_guest(guests, "ck")
    files = JobFiles.of(daemon.config.spool, "ck")
    files.dir.mkdir(parents=True)
    (files.dir / "periodic.1.save").write_bytes(b"good")
    with pytest.raises(CheckpointFailed, match="periodic checkpoint failed: .*; the previous "
                                               "one is kept"):
        periodic_checkpoint(daemon.config, daemon.store, daemon.hosts.conns(), "ck")
    assert (files.dir / "periodic.1.save").read_bytes() == b"good"
    assert sorted(p.name for p in files.dir.glob("periodic.*")) == ["periodic.1.save"]
    record = daemon.store.job("ck")
    assert record is not None and record.state == JobState.RUNNING
    assert record.spec["checkpoint"] == previous.to_dict()
    conn = libvirt.open("test:///default")
    try:  # paused for the checkpoint, resumed after its failure
        assert conn.lookupByName("vmjob-ck").state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()


def test_periodic_checkpoints_refuse_a_job_that_does_not_run(daemon: Daemon,  # noqa: F811
                                                             tmp_path: Path) -> None:
    add(daemon, "q", JobState.QUEUED, alloc("a", 0))
    with pytest.raises(Exception, match="not RUNNING"):
        periodic_checkpoint(daemon.config, daemon.store, daemon.hosts.conns(), "q")


def test_checkpoints_come_every_interval_for_running_restore_jobs_only(
        daemon: Daemon) -> None:  # noqa: F811
    add(daemon, "ck", JobState.RUNNING, alloc("a", 0), on_host_loss="restore",
        checkpoint_every=60)
    add(daemon, "plain", JobState.RUNNING, alloc("a", 1))
    for job_id in ("ck", "plain"):
        daemon.admit(Active(job_id, "a", None, phase=Phase.RUNNING))
    checkpointer = Checkpointer(daemon)
    with daemon.lock:
        assert checkpointer._next(1000.0) == (None, 60.0)  # first seen running now
        assert checkpointer._next(1059.0) == (None, 1.0)
        assert checkpointer._next(1060.0) == ("ck", None)
        daemon.active["ck"].phase = Phase.MOVING  # being moved: not now, and forgotten
        assert checkpointer._next(1070.0) == (None, None)
        assert "ck" not in checkpointer.since
