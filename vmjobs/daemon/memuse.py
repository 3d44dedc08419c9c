"""Real memory use of running guests (issue 13 part 1; docs/borrowing.md "Borrowing memory"):
what each guest's balloon reports, kept as a rolling window per job.

Every guest of a sampling daemon has a virtio balloon with a statistics period
(`Config.balloon_period_s`); the host never inflates it. The sampler reads its statistics
(`virDomainMemoryStats`) at the same interval as the vCPU times. Per sample:

- `held`: the balloon's `actual` size, the memory the guest has (its job's `--mem`);
- `usable`: the guest's MemAvailable, what it could still allocate without swapping
  (reported by the guest: untrusted, clamped to 0..held);
- `resident`: QEMU's resident memory on the host (`rss`: measured by the host, beyond the
  guest's reach; it includes QEMU's own memory, so it errs on the high side);
- `used` = held - usable: what the guest cannot give up without swapping;
- `spare` = min(usable, held - resident): memory the guest does not need now *and* has never
  made the host back with pages (a page the guest touched stays resident on the host until
  the guest exits: without inflating the balloon, the host cannot take it back). A guest
  cannot inflate its own spare by lying: the host's `rss` bounds it.

The lending rule built on these (placement/memlending.py) takes the smallest spare over
`borrow.for`, so a brief peak of use in that window lends nothing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

MAX_MEMORY_SAMPLES = 10_000  # whatever the window, a job's memory window stays bounded


@dataclass(frozen=True)
class MemorySample:
    """One reading of a guest's memory (KiB), at `at` (time.monotonic(), s). `usable` None:
    the guest's balloon driver has not reported yet (or the guest has no balloon)."""

    at: float
    held_kib: int
    usable_kib: int | None
    resident_kib: int | None

    @property
    def used_kib(self) -> int | None:
        """What the guest uses and cannot give up without swapping: held - usable."""
        return None if self.usable_kib is None else self.held_kib - self.usable_kib

    @property
    def spare_kib(self) -> int | None:
        """min(usable, held - resident), at least 0; None without the guest's figures or the
        host's rss (nothing is lent on half a reading)."""
        if self.usable_kib is None or self.resident_kib is None:
            return None
        return max(0, min(self.usable_kib, self.held_kib - self.resident_kib))

    @property
    def spare_now_kib(self) -> int | None:
        """The spare a give-back is decided on: `spare_kib`, or, while the guest's figures
        are missing (its balloon stopped reporting), held - resident alone (the host's own
        measure: a guest cannot use memory without the host backing it). None without rss."""
        if self.resident_kib is None:
            return None
        host = self.held_kib - self.resident_kib
        return max(0, host if self.usable_kib is None else min(self.usable_kib, host))


def memory_sample(at: float, stats: Mapping[str, int]) -> MemorySample | None:
    """A sample from libvirt's memory statistics (KiB, `virt.stats.memory_stats_kib`); None
    when they lack the balloon's size (`actual`: no balloon, or the guest is gone). The
    guest's `usable` is untrusted: a value outside 0..held is clamped; it counts only once the
    guest has reported (`last_update` > 0, or `usable` present where libvirt gives no time)."""
    held = stats.get("actual")
    if held is None or held <= 0:
        return None
    usable = stats.get("usable")
    if usable is not None and stats.get("last_update", 1) <= 0:
        usable = None  # libvirt's placeholder before the guest's first report
    if usable is not None:
        usable = min(max(usable, 0), held)
    resident = stats.get("rss")
    return MemorySample(at, held, usable, None if resident is None or resident < 0 else resident)


def min_spare_kib(samples: list[MemorySample], over_s: float, now: float) -> int | None:
    """The smallest spare over the last `over_s` seconds before `now`, or None unless the
    samples cover that whole span (the oldest at or before `now - over_s`) and every sample in
    it has a spare: memory is lent only after `borrow.for` of spare, like a core."""
    start = now - over_s
    if not samples or samples[0].at > start:
        return None
    # the last sample at or before the start stood for the time up to the next one
    spans = [[s for s in samples if s.at <= start][-1], *(s for s in samples if s.at > start)]
    spares = [s.spare_kib for s in spans]
    if any(spare is None for spare in spares):
        return None
    return min(spare for spare in spares if spare is not None)


class MemoryWindows:
    """The memory samples per running job over the last `window_s` (plus the one before it),
    guarded by its own lock (readers: metrics scrapes, `show`, lending)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._windows: dict[str, deque[MemorySample]] = {}

    def record(self, job_id: str, sample: MemorySample) -> None:
        with self._lock:
            window = self._windows.setdefault(job_id, deque(maxlen=MAX_MEMORY_SAMPLES))
            window.append(sample)
            # keep one sample older than the window: it covers the window's start
            while len(window) > 1 and window[1].at <= sample.at - self.window_s:
                window.popleft()

    def keep_only(self, job_ids: set[str]) -> None:
        with self._lock:
            for gone in set(self._windows) - job_ids:
                del self._windows[gone]

    def latest(self, job_id: str) -> MemorySample | None:
        with self._lock:
            window = self._windows.get(job_id)
            return window[-1] if window else None

    def min_spare_kib(self, job_id: str, over_s: float, now: float) -> int | None:
        """`min_spare_kib` over the job's window (None: not covered, or not reported)."""
        with self._lock:
            samples = list(self._windows.get(job_id, ()))
        return min_spare_kib(samples, over_s, now)
