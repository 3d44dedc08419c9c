"""The daemon's loops survive their own failures (issue 8): a scheduling pass that raises, a
worker thread that raises, deadlines that are not numbers. The daemon runs in-process on
libvirt's test driver (`test:///default`), so no guest boots and no lock is needed."""

from __future__ import annotations

import io
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from placement import Request
from tests.libvirt_test.test_recovery_moves import add, alloc, run_guest
from tests.libvirt_test.test_recovery_moves import daemon as daemon  # noqa: F401 (fixture)
from tests.libvirt_test.test_recovery_moves import guests as guests  # noqa: F401 (fixture)
from vmjobs.daemon import core, scheduler
from vmjobs.daemon.api import Api
from vmjobs.daemon.core import Active, Daemon, time_limit_of
from vmjobs.daemon.hosts import GuestPoweredOff
from vmjobs.daemon.identity import Caller
from vmjobs.daemon.server import ApiError, ApiRequest
from vmjobs.jobs import JobRecord, JobState

BOUND_S = 30.0  # generous: these wait on events, never on a timing


def submit(d: Daemon, job_id: str, cpus: int = 1, **spec: Any) -> None:
    record = JobRecord(id=job_id, owner="root", uid=0, state=JobState.QUEUED,
                       spec={"argv": ["true"], "image": "none", **spec})
    with d.lock:
        d.store.submit(record, Request(cpus=cpus, memory_mib=128), "test")
        d.wake()


def state_of(d: Daemon, job_id: str) -> JobState:
    record = d.store.job(job_id)
    assert record is not None
    return record.state


def wait_until(d: Daemon, done: Any) -> None:
    with d.lock:
        assert d.changed.wait_for(done, BOUND_S), "the daemon never got there"


@pytest.fixture
def running_scheduler(daemon: Daemon) -> Iterator[threading.Thread]:  # noqa: F811
    thread = threading.Thread(target=scheduler.run, args=(daemon,), name="scheduler",
                              daemon=True)
    thread.start()
    wait_until(daemon, lambda: daemon.scheduler.running)
    yield thread
    daemon.shutdown()
    thread.join(BOUND_S)


def test_a_failing_pass_names_its_job_ends_it_and_the_loop_goes_on(
        daemon: Daemon, running_scheduler: threading.Thread,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = scheduler.describe_allocation
    injected: list[str] = []

    def broken_once(allocation: Any) -> str:
        if not injected:
            injected.append("once")
            raise RuntimeError("injected failure")
        return real(allocation)

    monkeypatch.setattr(scheduler, "describe_allocation", broken_once)
    caplog.set_level(logging.ERROR, "vmjobs.daemon")
    submit(daemon, "first")
    wait_until(daemon, lambda: state_of(daemon, "first").finished)
    record = daemon.store.job("first")
    assert record is not None and record.state == JobState.FAILED
    assert "RuntimeError: injected failure" in (record.message or "")
    assert any("scheduling pass failed on job first" in r.getMessage()
               for r in caplog.records)
    assert daemon.store.reservation_count() == 0
    # the loop went on: the next job is scheduled (and, with no image here, fails to start)
    submit(daemon, "second")
    wait_until(daemon, lambda: state_of(daemon, "second").finished)
    second = daemon.store.job("second")
    assert second is not None and "could not start" in (second.message or "")
    assert running_scheduler.is_alive() and daemon.scheduler.running
    assert daemon.scheduler.failed_passes == 1
    assert "injected failure" in (daemon.scheduler.last_failure or "")


def test_a_deadline_that_is_not_a_number_neither_kills_nor_spins_the_scheduler(
        daemon: Daemon, running_scheduler: threading.Thread) -> None:  # noqa: F811
    # 64 cpus never fit the test driver's host: the job waits, with a NaN --wait-timeout
    submit(daemon, "nan-wait", cpus=64, wait_deadline=math.nan)
    wait_until(daemon, lambda: "nan-wait" in daemon.waits)
    cpu = time.process_time()
    time.sleep(2.0)
    used = time.process_time() - cpu
    assert running_scheduler.is_alive() and daemon.scheduler.running
    assert used < 1.0, f"{used:.2f}s of CPU in 2s while one job waits"
    submit(daemon, "after")  # still scheduled
    wait_until(daemon, lambda: state_of(daemon, "after").finished)
    assert daemon.scheduler.failed_passes == 0


@pytest.mark.parametrize("value, limit", [
    (None, None), (0, None), (30, 30.0), ("45", 45.0), (math.nan, None), (math.inf, None),
    (-5, None), ("soon", None),
])
def test_time_limits_that_are_not_positive_numbers_count_as_none(value: Any,
                                                                 limit: float | None) -> None:
    record = JobRecord(id="j", owner="root", uid=0, state=JobState.QUEUED,
                       spec={"argv": ["true"], "timeout_s": value})
    assert time_limit_of(record) == limit


@pytest.mark.parametrize("due, now, sleep", [
    (None, 100.0, None), (150.0, 100.0, 50.0), (50.0, 100.0, 0.0),
    (math.nan, 100.0, scheduler.MAX_SLEEP_S), (1e300, 100.0, scheduler.MAX_SLEEP_S),
])
def test_the_scheduler_sleeps_a_bounded_finite_time(due: float | None, now: float,
                                                    sleep: float | None) -> None:
    assert scheduler.sleep_for(due, now) == sleep


def test_a_collect_that_raises_ends_the_job_failed_and_frees_everything(
        daemon: Daemon, guests: list[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    # as tarfile does on Python 3.11.2, which has no extraction filters
    def old_tarfile(*_args: Any) -> None:
        raise TypeError("TarFile.extractall() got an unexpected keyword argument 'filter'")

    monkeypatch.setattr(core, "collect", old_tarfile)
    add(daemon, "j1", JobState.RUNNING, alloc("a", 1))
    run_guest(guests, "j1")
    with daemon.lock:
        daemon.active["j1"] = Active("j1", "a", None, phase="running")
    daemon._guest_powered_off(GuestPoweredOff("a", "j1", time.time()))
    wait_until(daemon, lambda: state_of(daemon, "j1").finished and "j1" not in daemon.active)
    record = daemon.store.job("j1")
    assert record is not None and record.state == JobState.FAILED
    assert record.message == ("vmjob failed: TypeError: TarFile.extractall() got an "
                              "unexpected keyword argument 'filter'")
    assert daemon.store.reserved_cpus("a") == {}
    # the guest nobody would collect is gone too
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName("vmjob-j1")
    finally:
        conn.close()


def test_a_launch_that_raises_after_the_guest_started_ends_the_job_failed(
        daemon: Daemon, guests: list[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    def started(record: JobRecord) -> tuple[libvirt.virDomain, str]:
        with daemon.lock:  # as the real one does before createXML
            daemon.store.transition(record.id, JobState.STARTING, "starting (test)")
        run_guest(guests, record.id)
        return libvirt.open("test:///default").lookupByName(f"vmjob-{record.id}"), "test"

    def broken(*_args: Any) -> None:
        raise ZeroDivisionError("injected after the start")

    add(daemon, "j2", JobState.PLACED, alloc("a", 2))
    monkeypatch.setattr(daemon, "_start_guest", started)
    monkeypatch.setattr(daemon.metrics, "started", broken)
    with daemon.lock:
        daemon.active["j2"] = Active("j2", "a", None)
    daemon.spawn(daemon.launch, "j2", name="launch-j2", job_id="j2")
    wait_until(daemon, lambda: state_of(daemon, "j2").finished and "j2" not in daemon.active)
    record = daemon.store.job("j2")
    assert record is not None and record.state == JobState.FAILED
    assert record.message == "vmjob failed: ZeroDivisionError: injected after the start"
    assert daemon.store.reserved_cpus("a") == {}
    conn = libvirt.open("test:///default")
    try:
        assert "vmjob-j2" not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def test_an_end_the_full_store_cannot_take_is_reported_and_recorded_once_there_is_room(
        daemon: Daemon, guests: list[str],  # noqa: F811
        running_scheduler: threading.Thread, monkeypatch: pytest.MonkeyPatch) -> None:
    full = threading.Event()
    full.set()
    real = daemon.store.transition

    def transition(job_id: str, state: JobState, *args: Any, **kwargs: Any) -> None:
        if full.is_set() and state.finished:
            raise sqlite3.OperationalError("database or disk is full")
        real(job_id, state, *args, **kwargs)

    monkeypatch.setattr(daemon.store, "transition", transition)
    # libvirt's STOPPED event reaches the daemon through its notes thread
    threading.Thread(target=daemon.notes_loop, name="notes", daemon=True).start()
    add(daemon, "j3", JobState.RUNNING, alloc("a", 3))
    run_guest(guests, "j3")
    with daemon.lock:
        daemon.active["j3"] = Active("j3", "a", None, phase="running")
    request = ApiRequest("POST", "/v1/jobs/j3/cancel", {}, {"id": "j3"},
                         Caller(0, "root", True), 0, io.BytesIO())
    with pytest.raises(ApiError) as refused:  # the cancel says it could not be recorded
        Api(daemon).cancel(request)
    assert refused.value.status == 503
    assert "database or disk is full" in str(refused.value)
    assert state_of(daemon, "j3") == JobState.RUNNING  # nothing recorded that did not happen
    assert daemon.store.reserved_cpus("a") == {3: "j3"}
    cpu = time.process_time()
    time.sleep(2.0)  # retries are spaced, not a spin
    assert time.process_time() - cpu < 1.0
    full.clear()  # room again: the end is recorded and everything freed
    wait_until(daemon, lambda: state_of(daemon, "j3").finished and not daemon.unrecorded)
    assert state_of(daemon, "j3") == JobState.CANCELLED
    assert daemon.store.reserved_cpus("a") == {}
    assert "j3" not in daemon.active
