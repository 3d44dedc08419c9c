"""Real CPU use of running guests: the daemon samples each one's vCPU time from libvirt every
`usage_sample_interval` and keeps the last `usage_window` of samples per job.

`cores_used` (pure) turns a window of samples into cores used; `Sampler` keeps the windows
and runs the one sampling thread. The thread sleeps on the daemon's condition variable with
a deadline, so it wakes with the daemon's changes (to stop promptly) but reads libvirt only
once per interval.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmjobs.jobs import domain_name
from vmjobs.virt import Connection, VirtError
from vmjobs.virt.conn import lookup_domain
from vmjobs.virt.stats import vcpu_time_ns

log = logging.getLogger("vmjobs.daemon")

MAX_WINDOW_SAMPLES = 10_000  # whatever the config says, a job's window stays bounded


@dataclass(frozen=True)
class Sample:
    """`vcpu_ns`: the guest's total vCPU time (ns) read at `at` (time.monotonic(), s)."""

    at: float
    vcpu_ns: int


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


def window_samples(interval_s: float, window_s: float) -> int:
    """Samples kept per job so that the window spans `window_s`: one more than the intervals
    in it (a rate needs both ends), at least 2, at most MAX_WINDOW_SAMPLES."""
    return max(2, min(MAX_WINDOW_SAMPLES, math.ceil(window_s / interval_s) + 1))


class Sampler:
    """The windows of samples per running job, guarded by its own lock (readers: metrics
    scrapes and `show`, which may hold the daemon's lock; the sampler never takes the
    daemon's lock while holding this one)."""

    def __init__(self, interval_s: float, window_s: float,
                 read: Callable[[str, str], int | None]) -> None:
        """`interval_s` 0: sampling is off. `read(host, job_id)`: the guest's vCPU ns, or
        None if it cannot be read now."""
        self.interval_s = interval_s
        self.size = window_samples(interval_s, window_s) if interval_s > 0 else 2
        self._lock = threading.Lock()
        self._windows: dict[str, deque[Sample]] = {}
        self._read = read

    def record(self, job_id: str, sample: Sample) -> None:
        with self._lock:
            self._windows.setdefault(job_id, deque(maxlen=self.size)).append(sample)

    def keep_only(self, job_ids: set[str]) -> None:
        """Forget the windows of jobs that no longer run."""
        with self._lock:
            for gone in set(self._windows) - job_ids:
                del self._windows[gone]

    def used(self, job_id: str) -> CpuUse | None:
        with self._lock:
            window = list(self._windows.get(job_id, ()))
        return cores_used(window)

    def sample_once(self, running: Sequence[tuple[str, str]]) -> None:
        """Read each (job, host) guest's vCPU time once and add it to its window."""
        for job_id, host in running:
            value = self._read(host, job_id)
            if value is not None:
                self.record(job_id, Sample(time.monotonic(), value))
        self.keep_only({job_id for job_id, _host in running})

    def run(self, changed: threading.Condition, stopping: Callable[[], bool],
            running: Callable[[], list[tuple[str, str]]]) -> None:
        """Thread: every interval, sample the guests `running()` names ((job, host) pairs,
        read under `changed`'s lock), until `stopping()` (checked whenever `changed` is
        notified, so the daemon's shutdown ends it at once)."""
        next_at = time.monotonic()
        while True:
            with changed:
                while not stopping() and time.monotonic() < next_at:
                    changed.wait(next_at - time.monotonic())
                if stopping():
                    return
                guests = running()
            next_at = time.monotonic() + self.interval_s
            try:
                self.sample_once(guests)
            except Exception:  # a sampler bug must not end sampling for good
                log.exception("sampling guests' CPU use failed")


def read_vcpu_ns(conn: Connection | None, job_id: str) -> int | None:
    """The job's guest's vCPU ns through `conn`, or None (host down: no connection; guest
    gone meanwhile)."""
    if conn is None:
        return None
    try:
        dom = lookup_domain(conn, domain_name(job_id))
        return None if dom is None else vcpu_time_ns(dom)
    except VirtError:
        return None
