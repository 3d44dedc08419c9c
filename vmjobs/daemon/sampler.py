"""Real CPU use of running guests: the daemon samples each one's vCPU time per vCPU from
libvirt every `usage_sample_interval` and keeps the last `usage_window` of samples per job.

`cores_used` (pure) turns a window of samples into cores used; `idle_after` (pure) follows
how long each vCPU has stayed below the lending threshold (docs/borrowing.md); `Sampler`
keeps the windows and runs the one sampling thread. The thread sleeps on the daemon's
condition variable with a deadline, so it wakes with the daemon's changes (to stop promptly)
but reads libvirt only once per interval — and, while cores are lent, reads the lending
owners (only them) at the shorter `fast_interval_s`, so that an owner wanting its cores back
is seen within a fraction of `give_back_within`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmjobs.daemon.memuse import MemoryWindows, memory_sample
from vmjobs.jobs import domain_name
from vmjobs.virt import Connection, VirtError
from vmjobs.virt.conn import lookup_domain
from vmjobs.virt.stats import memory_stats_kib, vcpu_times_ns

log = logging.getLogger("vmjobs.daemon")

MAX_WINDOW_SAMPLES = 10_000  # whatever the config says, a job's window stays bounded


@dataclass(frozen=True)
class Sample:
    """`per_vcpu_ns[i]`: the CPU time (ns) vCPU i had run, read at `at` (time.monotonic(),
    s)."""

    at: float
    per_vcpu_ns: tuple[int, ...]

    @property
    def vcpu_ns(self) -> int:
        return sum(self.per_vcpu_ns)


@dataclass(frozen=True)
class CpuUse:
    """Cores a job used on average over the last `over_s` seconds (0.0 .. its vCPUs)."""

    cores: float
    over_s: float


def cores_used(samples: Sequence[Sample]) -> CpuUse | None:
    """Mean cores used over a window of samples: Σ Δ vCPU-seconds / Σ Δ wall seconds over
    consecutive pairs. A pair whose counter went back (the guest's QEMU process is new: a
    migration or restore) says nothing and is left out, time included. None with no usable
    pair (fewer than two samples, or no time between them)."""
    busy_ns = 0
    wall_s = 0.0
    for before, after in zip(samples, samples[1:], strict=False):
        if after.vcpu_ns < before.vcpu_ns or after.at <= before.at:
            continue
        busy_ns += after.vcpu_ns - before.vcpu_ns
        wall_s += after.at - before.at
    if wall_s <= 0:
        return None
    return CpuUse(busy_ns / 1e9 / wall_s, wall_s)


def vcpu_rates(before: Sample, after: Sample) -> tuple[float, ...] | None:
    """Cores each vCPU used between two samples (0.0 .. 1.0 each); None when the pair says
    nothing (no time between them, another vCPU count, or a counter that went back: a new
    QEMU process after a migration or restore)."""
    wall = after.at - before.at
    if wall <= 0 or len(after.per_vcpu_ns) != len(before.per_vcpu_ns):
        return None
    deltas = [a - b for a, b in zip(after.per_vcpu_ns, before.per_vcpu_ns, strict=True)]
    if any(d < 0 for d in deltas):
        return None
    return tuple(d / 1e9 / wall for d in deltas)


def idle_after(idle_since: Sequence[float | None] | None, before: Sample, after: Sample,
               idle_below: float) -> list[float | None] | None:
    """Since when (the `at` of a sample) each vCPU has used less than `idle_below` of a core
    in every pair of samples, given the previous answer and the newest pair; None for a vCPU
    busy in the newest pair. A pair that says nothing (`vcpu_rates` None) starts over: the
    answer is None (unknown) for every vCPU."""
    rates = vcpu_rates(before, after)
    if rates is None:
        return None
    previous = list(idle_since) if idle_since is not None and len(idle_since) == len(rates) \
        else [None] * len(rates)
    return [None if rate >= idle_below else (was if was is not None else before.at)
            for rate, was in zip(rates, previous, strict=True)]


def window_samples(interval_s: float, window_s: float) -> int:
    """Samples kept per job so that the window spans `window_s`: one more than the intervals
    in it (a rate needs both ends), at least 2, at most MAX_WINDOW_SAMPLES."""
    return max(2, min(MAX_WINDOW_SAMPLES, math.ceil(window_s / interval_s) + 1))


class Sampler:
    """The windows of samples per running job, guarded by its own lock (readers: metrics
    scrapes and `show`, which may hold the daemon's lock; the sampler never takes the
    daemon's lock while holding this one)."""

    def __init__(self, interval_s: float, window_s: float,
                 read: Callable[[str, str], tuple[int, ...] | None],
                 idle_below: float | None = None, fast_interval_s: float | None = None,
                 read_memory: Callable[[str, str], dict[str, int] | None] | None = None,
                 memory_window_s: float | None = None) -> None:
        """`interval_s` 0: sampling is off. `read(host, job_id)`: the guest's vCPU ns per
        vCPU, or None if it cannot be read now. `idle_below` (a fraction of a core): follow
        how long each vCPU stays below it (lending; None: not followed). `fast_interval_s`:
        how often the jobs `run`'s `fast()` names are read (lending owners).
        `read_memory(host, job_id)`: the guest's memory statistics (KiB, `memory_stats_kib`)
        or None, read with its vCPU times into `memory` (daemon/memuse.py), whose window spans
        `memory_window_s` (default `window_s`)."""
        self.interval_s = interval_s
        self.fast_interval_s = fast_interval_s or interval_s
        self.size = window_samples(interval_s, window_s) if interval_s > 0 else 2
        self.idle_below = idle_below
        self._lock = threading.Lock()
        self._windows: dict[str, deque[Sample]] = {}
        self._idle: dict[str, list[float | None]] = {}
        self._busy: dict[str, tuple[int, ...]] = {}  # vCPUs above idle_below in the last pair
        self._read = read
        self._read_memory = read_memory
        self.memory = MemoryWindows(memory_window_s or window_s)

    def record(self, job_id: str, sample: Sample) -> None:
        with self._lock:
            window = self._windows.setdefault(job_id, deque(maxlen=self.size))
            if self.idle_below is not None and window:
                before = window[-1]
                idle = idle_after(self._idle.get(job_id), before, sample, self.idle_below)
                if idle is None:
                    self._idle.pop(job_id, None)
                    self._busy.pop(job_id, None)
                else:
                    self._idle[job_id] = idle
                    self._busy[job_id] = tuple(i for i, since in enumerate(idle)
                                               if since is None)
            window.append(sample)

    def keep_only(self, job_ids: set[str]) -> None:
        """Forget the windows of jobs that no longer run."""
        with self._lock:
            for gone in set(self._windows) - job_ids:
                del self._windows[gone]
                self._idle.pop(gone, None)
                self._busy.pop(gone, None)

    def used(self, job_id: str) -> CpuUse | None:
        with self._lock:
            window = list(self._windows.get(job_id, ()))
        return cores_used(window)

    def idle_s(self, now: float | None = None) -> dict[str, list[float]]:
        """job -> seconds each vCPU has stayed below `idle_below` (0: busy in the last pair),
        for the jobs with a usable pair; `now` in time.monotonic() seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return {job: [0.0 if since is None else max(0.0, now - since) for since in idle]
                    for job, idle in self._idle.items()}

    def busy_vcpus(self, job_id: str) -> tuple[int, ...]:
        """The job's vCPUs that ran above `idle_below` between its last two samples."""
        with self._lock:
            return self._busy.get(job_id, ())

    def sample_once(self, running: Sequence[tuple[str, str]], forget: bool = True) -> None:
        """Read each (job, host) guest's vCPU times once and add them to its window.
        `forget`: the list is every running guest; windows of the others are dropped."""
        for job_id, host in running:
            value = self._read(host, job_id)
            if value is not None:
                self.record(job_id, Sample(time.monotonic(), value))
            stats = self._read_memory(host, job_id) if self._read_memory is not None else None
            memory = memory_sample(time.monotonic(), stats) if stats is not None else None
            if memory is not None:
                self.memory.record(job_id, memory)
        if forget:
            self.keep_only({job_id for job_id, _host in running})
            self.memory.keep_only({job_id for job_id, _host in running})

    def run(self, changed: threading.Condition, stopping: Callable[[], bool],
            running: Callable[[], list[tuple[str, str]]],
            fast: Callable[[], list[tuple[str, str]]] = lambda: [],
            after: Callable[[set[str]], None] = lambda _jobs: None) -> None:
        """Thread: every interval, sample the guests `running()` names ((job, host) pairs,
        read under `changed`'s lock), and every `fast_interval_s` those `fast()` names (read
        likewise; empty: no fast reads), until `stopping()` (checked whenever `changed` is
        notified, so the daemon's shutdown ends it at once). `after(jobs)` is called, without
        the lock, with the jobs just sampled."""
        next_all = time.monotonic()
        next_fast = next_all
        while True:
            with changed:
                while True:
                    if stopping():
                        return
                    now = time.monotonic()
                    quick = fast()
                    due = min(next_all, next_fast) if quick else next_all
                    if now >= due:
                        break
                    changed.wait(due - now)
                everyone = now >= next_all
                guests = running() if everyone else quick
            if everyone:
                next_all = now + self.interval_s
            next_fast = now + self.fast_interval_s
            try:
                self.sample_once(guests, forget=everyone)
                after({job_id for job_id, _host in guests})
            except Exception:  # a sampler bug must not end sampling for good
                log.exception("sampling guests' CPU use failed")


def read_vcpu_ns(conn: Connection | None, job_id: str) -> tuple[int, ...] | None:
    """The job's guest's vCPU ns per vCPU through `conn`, or None (host down: no
    connection; guest gone meanwhile)."""
    if conn is None:
        return None
    try:
        dom = lookup_domain(conn, domain_name(job_id))
        return None if dom is None else vcpu_times_ns(dom)
    except VirtError:
        return None


def read_memory_kib(conn: Connection | None, job_id: str) -> dict[str, int] | None:
    """The job's guest's memory statistics (KiB) through `conn`, or None (host down, guest
    gone meanwhile)."""
    if conn is None:
        return None
    try:
        dom = lookup_domain(conn, domain_name(job_id))
        return None if dom is None else memory_stats_kib(dom)
    except VirtError:
        return None
