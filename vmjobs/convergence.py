"""The convergence policy of a live migration, as a pure step function.

A live migration copies memory while the guest keeps dirtying it; it converges when what is
left fits in the allowed downtime. The driver loop (`virt.migration.migrate_domain`) polls libvirt's
job statistics and asks `step` what to do: raise the downtime limit while the copy stalls,
switch to post-copy at the ceiling, or abort (a completion timeout scaled per GiB, no progress
for a while, or a stop the caller asks for). Nova's `live_migration_monitor` makes the same
decisions inline in its loop over libvirt; here they are separate so that every rule is
tested without libvirt (`tests/unit/test_convergence.py`).

No libvirt, no clock: times are the caller's monotonic seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Policy:
    """How hard to try before giving up; the defaults suit guests of up to a few GiB."""

    max_downtime_ms: int = 300  # where the downtime limit starts
    downtime_ceiling_ms: int = 2400  # raised in steps (x2) while stalled, never above this
    stall_s: float = 2.0  # remaining memory made no new low for this long: stalled
    bandwidth_mib_s: int | None = None
    auto_converge: bool = False
    postcopy: bool = False  # switch to post-copy once the downtime is at its ceiling
    timeout_s: float | None = None  # completion timeout; None: base + per GiB
    timeout_base_s: float = 30.0
    timeout_per_gib_s: float = 60.0
    progress_timeout_s: float = 30.0  # no new low for this long: abort
    # libvirt calls a migration "unsafe" when it cannot prove a disk's storage is shared and
    # the disk is cached. The only disk is the output disk, which the init writes once, at the
    # job's end, and QEMU flushes at the switch-over; the spool is shared by contract.
    shared_storage: bool = True
    max_outbound: int = 1  # migrations leaving one host at once
    slot_wait_s: float = 600.0  # how long to wait for an outbound slot

    def completion_timeout(self, memory_mib: int) -> float:
        """Seconds a migration of a `memory_mib` guest may take before it is aborted."""
        if self.timeout_s is not None:
            return self.timeout_s
        return self.timeout_base_s + self.timeout_per_gib_s * memory_mib / 1024


@dataclass(frozen=True)
class Watch:
    """What the driver loop carries from one poll to the next."""

    started: float
    deadline: float
    memory_mib: int
    downtime_ms: int  # the limit in force
    best: int | None = None  # the lowest remaining memory seen, bytes
    best_at: float = 0.0
    stalled_since: float = 0.0
    in_postcopy: bool = False
    aborted: str | None = None  # why the migration is being aborted


def watch(policy: Policy, memory_mib: int, now: float) -> Watch:
    """The state at the start of a migration of a `memory_mib` guest."""
    return Watch(started=now, deadline=now + policy.completion_timeout(memory_mib),
                 memory_mib=memory_mib, downtime_ms=policy.max_downtime_ms, best_at=now,
                 stalled_since=now)


@dataclass(frozen=True)
class Step:
    """What to do after one poll: the new state and the actions for the driver."""

    watch: Watch
    phase: str  # "copying" | "stalled" | "post-copy" | "aborting"
    set_downtime_ms: int | None = None  # call migrateSetMaxDowntime with this
    start_postcopy: bool = False  # call migrateStartPostCopy
    abort: str | None = None  # call abortJob, for this reason
    notes: tuple[str, ...] = ()  # what the policy did, for the move's record


def step(current: Watch, policy: Policy, now: float, remaining: int, total: int,
         stop_reason: str | None = None) -> Step:
    """One poll's decision.

    `remaining`/`total`: libvirt's memory remaining and total, bytes (0 before the copy
    starts); `stop_reason`: a stop asked for by the caller (a cancel, a time limit), which
    aborts the migration unless it is in post-copy, where the guest already runs on the
    destination and nothing may be aborted.
    """
    w = current
    if total and (w.best is None or remaining < w.best):
        w = replace(w, best=remaining, best_at=now, stalled_since=now)
    phase = "post-copy" if w.in_postcopy else "copying"
    notes: list[str] = []
    set_downtime: int | None = None
    postcopy = False
    elapsed = now - w.started
    if w.aborted is None and not w.in_postcopy and now - w.stalled_since >= policy.stall_s:
        phase = "stalled"
        w = replace(w, stalled_since=now)
        if w.downtime_ms < policy.downtime_ceiling_ms:
            set_downtime = min(w.downtime_ms * 2, policy.downtime_ceiling_ms)
            w = replace(w, downtime_ms=set_downtime)
            notes.append(f"{elapsed:.1f}s: stalled, downtime limit {set_downtime} ms")
        elif policy.postcopy:
            postcopy = True
            w = replace(w, in_postcopy=True)
            notes.append(f"{elapsed:.1f}s: stalled at the ceiling, post-copy")
    abort: str | None = None
    if w.aborted is None and not w.in_postcopy:
        if stop_reason:
            abort = f"stopped: {stop_reason}"
        elif now >= w.deadline:
            abort = (f"did not complete within {w.deadline - w.started:.0f}s "
                     f"({w.memory_mib} MiB guest)")
        elif now - w.best_at >= policy.progress_timeout_s:
            abort = f"made no progress for {policy.progress_timeout_s:.0f}s"
        if abort is not None:
            w = replace(w, aborted=abort)
            phase = "aborting"
            notes.append(f"{elapsed:.1f}s: aborting: {abort}")
    return Step(w, phase, set_downtime, postcopy, abort, tuple(notes))
