"""Scheduling passes on the live cluster model (issue 10): a pass costs what changed. The
daemon runs in-process on libvirt's test driver (`test:///default`, one host `a` of 16 cpus),
passes are made one at a time by the test, so no guest boots, no lock is needed and nothing
depends on a timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from placement import Request
from tests.libvirt_test.test_recovery_moves import daemon as daemon  # noqa: F401 (fixture)
from vmjobs.daemon import scheduler
from vmjobs.daemon.core import Daemon
from vmjobs.jobs import JobRecord, JobState
from vmjobs.store import Store


def submit(d: Daemon, job_id: str, cpus: int = 1) -> None:
    record = JobRecord(id=job_id, owner="root", uid=0, state=JobState.QUEUED,
                       spec={"argv": ["true"], "image": "none"})
    with d.lock:
        d.store.submit(record, Request(cpus=cpus, memory_mib=128), "test")


def one_pass(d: Daemon) -> None:
    with d.lock:
        scheduler.one_pass(d)


@pytest.fixture(autouse=True)
def no_launches(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The passes' launch threads would fail at once on the test driver (no image) and free
    their jobs while a test looks at the model: only the passes are under test here."""
    monkeypatch.setattr(daemon, "spawn", lambda *args, **kwargs: None)


def test_submits_behind_a_waiting_head_cost_only_themselves(
        daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    read: list[int] = []
    real = scheduler.holdings

    def counted(*args: Any) -> Any:
        read.append(1)
        return real(*args)

    monkeypatch.setattr(scheduler, "holdings", counted)
    other = Store(daemon.config.state_db)  # another process's view, as `vmjob drain` has
    other.cordon("a", "maintenance")
    submit(daemon, "head", cpus=2)
    one_pass(daemon)
    assert read == [1]  # a job waits: the holdings' end times are read, once
    for k in range(5):
        submit(daemon, f"s{k}")
        one_pass(daemon)
    assert read == [1]  # each later pass decided only the job added at the queue's end
    with daemon.lock:
        assert [daemon.waits[j].position for j in ("head", "s0", "s4")] == [1, 2, 6]
        assert "cordoned" in daemon.waits["s0"].reason or "no host" in daemon.waits["s0"].reason
    other.uncordon("a")  # seen through the store's change log, without a rebuild
    one_pass(daemon)
    with daemon.lock:
        placed = [j for j in ("head", "s0", "s4")
                  if daemon.store.job(j).state != JobState.QUEUED]  # type: ignore[union-attr]
        assert placed == ["head", "s0", "s4"]
        assert daemon.live.rebuilds == 1
        assert daemon.live.check() == []
    other.close()


def test_the_model_follows_the_daemons_own_passes(daemon: Daemon) -> None:  # noqa: F811
    for k in range(4):
        submit(daemon, f"j{k}", cpus=3)
    one_pass(daemon)
    with daemon.lock:
        held = set(daemon.live.cluster().allocations())
        assert held == {f"j{k}" for k in range(4)}
        assert daemon.live.check() == []
