"""Guests' memory from their balloons (vmjobs/daemon/memuse.py, pure): a reading from libvirt's
statistics (the guest's figures untrusted), the spare the lending rule uses, its minimum over a
window that must be covered, the rolling window, and the metrics of held vs used memory."""

from __future__ import annotations

from vmjobs.daemon.memuse import MemorySample, MemoryWindows, memory_sample, min_spare_kib
from vmjobs.daemon.metrics import JobMemory, _memory_use

MIB = 1024  # KiB


def test_a_reading_from_libvirts_statistics() -> None:
    stats = {"actual": 256 * MIB, "usable": 200 * MIB, "unused": 150 * MIB, "rss": 100 * MIB,
             "last_update": 1_700_000_000}
    reading = memory_sample(5.0, stats)
    assert reading == MemorySample(5.0, 256 * MIB, 200 * MIB, 100 * MIB)
    assert reading.used_kib == 56 * MIB
    assert reading.spare_kib == 156 * MIB  # held - resident is the smaller
    assert reading.spare_now_kib == 156 * MIB
    # no balloon (no `actual`): no reading
    assert memory_sample(5.0, {"rss": 100 * MIB}) is None
    # the guest has not reported yet: the host's part only
    early = memory_sample(5.0, {**stats, "last_update": 0})
    assert early is not None and early.usable_kib is None and early.used_kib is None
    assert early.spare_kib is None  # nothing is lent on half a reading
    assert early.spare_now_kib == 156 * MIB  # a give-back is still judged on the host's part
    # a guest that claims more than it has is held to what it has; a negative figure is 0
    liar = memory_sample(5.0, {**stats, "usable": 10_000 * MIB, "rss": 50 * MIB})
    assert liar is not None and liar.usable_kib == 256 * MIB
    assert liar.spare_kib == 206 * MIB  # bounded by what the host sees resident
    assert memory_sample(5.0, {**stats, "usable": -5}).used_kib == 256 * MIB  # type: ignore[union-attr]


def _at(at: float, spare_mib: int | None) -> MemorySample:
    if spare_mib is None:
        return MemorySample(at, 1024 * MIB, None, 0)
    return MemorySample(at, 1024 * MIB, spare_mib * MIB, 0)


def test_the_smallest_spare_needs_the_whole_window() -> None:
    samples = [_at(0, 500), _at(10, 300), _at(20, 400), _at(30, 450)]
    assert min_spare_kib(samples, 30, 30) == 300 * MIB
    # the sample before the window's start stood for its first seconds
    assert min_spare_kib(samples, 15, 30) == 300 * MIB
    assert min_spare_kib(samples, 10, 30) == 400 * MIB
    assert min_spare_kib(samples, 31, 30) is None  # measured for less than the window
    assert min_spare_kib([], 1, 30) is None
    assert min_spare_kib([*samples[:2], _at(20, None), samples[3]], 30, 30) is None


def test_the_window_keeps_one_sample_before_its_span() -> None:
    windows = MemoryWindows(20)
    for at in range(0, 60, 5):
        windows.record("j", _at(at, 100 + at))
    latest = windows.latest("j")
    assert latest is not None and latest.at == 55
    assert windows.min_spare_kib("j", 20, 55) == 135 * MIB  # 35 covers 35..40
    assert windows.min_spare_kib("j", 25, 55) is None  # older samples are gone
    windows.keep_only({"other"})
    assert windows.latest("j") is None


def test_metrics_of_held_and_used_memory_per_job_host_and_node() -> None:
    jobs = [JobMemory("x", "h", 1024, 256 << 20, 300 << 20, ((0, 768), (1, 256))),
            JobMemory("y", "h", 512, None, None, ((1, 512),))]  # no reading yet
    values = {(m.name, tuple(s.labels.items())): s.value
              for m in _memory_use(jobs) for s in m.samples}
    assert values[("vmjobs_job_memory_held_bytes", (("job", "x"), ("host", "h")))] == 1 << 30
    assert values[("vmjobs_job_memory_used_bytes", (("job", "x"), ("host", "h")))] == 256 << 20
    assert values[("vmjobs_job_memory_resident_bytes", (("job", "x"), ("host", "h")))] == \
        300 << 20
    assert ("vmjobs_job_memory_used_bytes", (("job", "y"), ("host", "h"))) not in values
    assert values[("vmjobs_host_memory_held_bytes", (("host", "h"),))] == 1536 << 20
    assert values[("vmjobs_host_memory_used_bytes", (("host", "h"),))] == 256 << 20
    assert values[("vmjobs_node_memory_used_bytes", (("host", "h"), ("node", "0")))] == \
        192 << 20  # x's use split 3:1 over its nodes
    assert values[("vmjobs_node_memory_held_bytes", (("host", "h"), ("node", "1")))] == \
        768 << 20
