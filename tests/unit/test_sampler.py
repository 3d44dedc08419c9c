"""The sampler's arithmetic (vmjobs.daemon.sampler): vCPU time deltas -> cores used."""

from __future__ import annotations

import time

import pytest

from vmjobs.daemon.sampler import (
    MAX_WINDOW_SAMPLES,
    Sample,
    Sampler,
    cores_used,
    idle_after,
    vcpu_rates,
    window_samples,
)

SEC = 1_000_000_000  # ns


def test_one_busy_vcpu_is_one_core() -> None:
    samples = [Sample(100.0, (5 * SEC,)), Sample(110.0, (15 * SEC,)), Sample(120.0, (25 * SEC,))]
    use = cores_used(samples)
    assert use is not None
    assert use.cores == pytest.approx(1.0) and use.over_s == pytest.approx(20.0)


def test_two_vcpus_half_busy_then_idle() -> None:
    # 10 s with 2 vCPUs at 50 % each (10 vCPU-s), then 10 s idle: 10 / 20 = 0.5 cores
    samples = [Sample(0.0, (0,)), Sample(10.0, (10 * SEC,)), Sample(20.0, (10 * SEC,))]
    assert cores_used(samples).cores == pytest.approx(0.5)  # type: ignore[union-attr]


def test_counter_reset_pair_is_left_out() -> None:
    # a migration: the new QEMU counts from 0; the pair across it says nothing (time too)
    samples = [Sample(0.0, (50 * SEC,)), Sample(10.0, (60 * SEC,)),  # 1 core for 10 s
               Sample(20.0, (1 * SEC,)),                          # reset: left out
               Sample(30.0, (1 * SEC,))]                          # idle for 10 s
    use = cores_used(samples)
    assert use is not None
    assert use.over_s == pytest.approx(20.0) and use.cores == pytest.approx(0.5)


def test_too_few_samples_say_nothing() -> None:
    assert cores_used([]) is None
    assert cores_used([Sample(1.0, (SEC,))]) is None
    assert cores_used([Sample(1.0, (SEC,)), Sample(1.0, (2 * SEC,))]) is None  # no time between


def test_window_is_bounded() -> None:
    assert window_samples(10, 60) == 7
    assert window_samples(10, 5) == 2
    assert window_samples(1, 86400) == MAX_WINDOW_SAMPLES


def test_sampler_keeps_a_rolling_window_and_forgets_ended_jobs() -> None:
    counters = {"a": 0, "b": 0}

    def read(_host: str, job_id: str) -> tuple[int, ...] | None:
        counters[job_id] += SEC  # each read: 1 vCPU-second more
        return (counters[job_id],)

    sampler = Sampler(interval_s=10, window_s=20, read=read)  # keeps 3 samples
    assert sampler.size == 3
    for _ in range(5):
        sampler.sample_once([("a", "h"), ("b", "h")])
    assert len(sampler._windows["a"]) == 3
    assert sampler.used("a") is not None
    sampler.sample_once([("a", "h")])
    assert "b" not in sampler._windows and sampler.used("b") is None


def test_thread_reads_once_per_interval_however_often_woken_and_stops_on_shutdown() -> None:
    import threading

    reads: list[str] = []
    first = threading.Event()

    def read(_host: str, job_id: str) -> tuple[int, ...]:
        reads.append(job_id)
        first.set()
        return (len(reads) * SEC,)

    changed = threading.Condition(threading.RLock())
    stopping = False
    sampler = Sampler(interval_s=3600, window_s=7200, read=read)
    thread = threading.Thread(target=sampler.run,
                              args=(changed, lambda: stopping, lambda: [("j", "h")]))
    thread.start()
    assert first.wait(30)  # the first sample is taken at once
    for _ in range(50):  # the daemon's changes wake it; none may make it read again
        with changed:
            changed.notify_all()
    with changed:
        stopping = True
        changed.notify_all()
    thread.join(30)
    assert not thread.is_alive()
    assert reads == ["j"]


def test_metrics_split_a_jobs_use_over_its_nodes() -> None:
    from vmjobs.daemon.metrics import JobCpu, _cpu_use

    jobs = [JobCpu("x", "h", 4, 2.0, ((0, 3), (1, 1))),  # 2 cores used of 4 held
            JobCpu("y", "h", 2, None, ((1, 2),))]        # not sampled yet
    values = {(m.name, tuple(s.labels.items())): s.value
              for m in _cpu_use(jobs) for s in m.samples}
    assert values[("vmjobs_host_cores_held", (("host", "h"),))] == 6
    assert values[("vmjobs_host_cores_used", (("host", "h"),))] == 2.0
    assert values[("vmjobs_node_cores_used", (("host", "h"), ("node", "0")))] == 1.5
    assert values[("vmjobs_node_cores_used", (("host", "h"), ("node", "1")))] == 0.5
    assert values[("vmjobs_node_cores_held", (("host", "h"), ("node", "1")))] == 3
    assert ("vmjobs_job_cores_used", (("job", "y"), ("host", "h"))) not in values


def test_per_vcpu_rates_and_idle_since() -> None:
    before, after = Sample(10.0, (1 * SEC, 5 * SEC)), Sample(12.0, (3 * SEC, 5 * SEC + SEC // 100))
    assert vcpu_rates(before, after) == (1.0, 0.005)
    # vCPU 0 busy, vCPU 1 idle since the pair's first sample
    assert idle_after(None, before, after, 0.1) == [None, 10.0]
    later = Sample(14.0, (3 * SEC, 5 * SEC + SEC // 50))
    assert idle_after([None, 10.0], after, later, 0.1) == [12.0, 10.0]  # keeps the start
    busy = Sample(16.0, (3 * SEC, 7 * SEC))
    assert idle_after([12.0, 10.0], later, busy, 0.1) == [12.0, None]
    restarted = Sample(18.0, (0, 0))  # a new QEMU process: nothing known any more
    assert vcpu_rates(busy, restarted) is None
    assert idle_after([12.0, None], busy, restarted, 0.1) is None
    assert vcpu_rates(busy, Sample(18.0, (3 * SEC,))) is None  # another vCPU count


def test_sampler_follows_idle_time_and_busy_vcpus() -> None:
    times = iter([(0, 0), (SEC, 0), (2 * SEC, 0), (2 * SEC, SEC)])
    sampler = Sampler(interval_s=1, window_s=10, read=lambda _h, _j: next(times),
                      idle_below=0.1)
    clock = [100.0]
    import vmjobs.daemon.sampler as module

    real = module.time.monotonic
    module.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        for _ in range(3):
            sampler.sample_once([("j", "h")])
            clock[0] += 1.0
        assert sampler.idle_s(now=103.0) == {"j": [0.0, 3.0]}
        assert sampler.busy_vcpus("j") == (0,)
        sampler.sample_once([("j", "h")])  # vCPU 1 wakes, vCPU 0 rests
        assert sampler.busy_vcpus("j") == (1,)
        assert sampler.idle_s(now=104.0) == {"j": [2.0, 0.0]}  # idle since 102
    finally:
        module.time.monotonic = real  # type: ignore[assignment]
    sampler.keep_only(set())
    assert sampler.idle_s() == {} and sampler.busy_vcpus("j") == ()


def test_thread_reads_lending_owners_at_the_fast_interval_only_while_there_are_some() -> None:
    import threading

    reads: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def read(_host: str, job_id: str) -> tuple[int, ...]:
        with lock:
            reads.append(job_id)
            if reads.count("owner") >= 4:
                enough.set()
        return (len(reads) * SEC,)

    changed = threading.Condition(threading.RLock())
    stopping = False
    fast: list[tuple[str, str]] = []
    after: list[set[str]] = []
    sampler = Sampler(interval_s=3600, window_s=7200, read=read, fast_interval_s=0.05)
    thread = threading.Thread(target=sampler.run, args=(
        changed, lambda: stopping, lambda: [("owner", "h"), ("other", "h")],
        lambda: list(fast), after.append))
    thread.start()
    deadline = time.monotonic() + 30
    while len(reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert sorted(reads) == ["other", "owner"]  # no loans: once per (long) interval
    with changed:
        fast.append(("owner", "h"))  # a loan begins: the daemon's change wakes the sampler
        changed.notify_all()
    assert enough.wait(30)
    with changed:
        stopping = True
        changed.notify_all()
    thread.join(30)
    assert reads.count("other") == 1  # the others are not read faster
    assert {"owner", "other"} in after and {"owner"} in after
