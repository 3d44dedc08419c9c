"""The live-migration convergence policy, step by step, without libvirt."""

from __future__ import annotations

from vmjobs.convergence import Policy, Step, Watch, step, watch

GIB = 1 << 30
POLICY = Policy(max_downtime_ms=300, downtime_ceiling_ms=1200, stall_s=2.0,
                progress_timeout_s=30.0, timeout_base_s=30.0, timeout_per_gib_s=60.0)


def _run(policy: Policy, polls: list[tuple[float, int]], stop_at: float | None = None,
         memory_mib: int = 1024) -> list[Step]:
    """Feed (time, remaining bytes) polls of a 1 GiB copy; returns every step."""
    w: Watch = watch(policy, memory_mib, 0.0)
    steps = []
    for now, remaining in polls:
        done = step(w, policy, now, remaining, GIB,
                    "cancelled" if stop_at is not None and now >= stop_at else None)
        w = done.watch
        steps.append(done)
    return steps


def test_the_completion_timeout_scales_with_memory() -> None:
    assert POLICY.completion_timeout(1024) == 90.0
    assert POLICY.completion_timeout(4096) == 270.0
    assert Policy(timeout_s=5).completion_timeout(4096) == 5


def test_steady_progress_changes_nothing() -> None:
    steps = _run(POLICY, [(t * 0.5, GIB - t * 50 * (1 << 20)) for t in range(1, 10)])
    assert all(s.phase == "copying" and s.set_downtime_ms is None and s.abort is None
               for s in steps)
    assert steps[-1].watch.downtime_ms == 300


def test_a_stall_doubles_the_downtime_up_to_the_ceiling_then_holds() -> None:
    # no new low after t=0.5: stalled at 2.5, 4.5, 6.5, 8.5 (every stall_s)
    steps = _run(POLICY, [(0.5, GIB // 2)] + [(0.5 + t * 0.5, GIB // 2) for t in range(1, 17)])
    raised = [s.set_downtime_ms for s in steps if s.set_downtime_ms is not None]
    assert raised == [600, 1200]  # then at the ceiling, no post-copy: nothing more
    assert [s.phase for s in steps].count("stalled") == 4
    assert steps[-1].watch.downtime_ms == 1200
    assert all(s.abort is None and not s.start_postcopy for s in steps)
    assert steps[4].notes == ("2.5s: stalled, downtime limit 600 ms",)


def test_at_the_ceiling_post_copy_when_allowed_and_then_never_an_abort() -> None:
    policy = Policy(max_downtime_ms=1200, downtime_ceiling_ms=1200, stall_s=2.0,
                    postcopy=True, timeout_s=10.0)
    steps = _run(policy, [(0.5, GIB // 2), (2.5, GIB // 2), (11.0, GIB // 2), (40.0, GIB // 2)],
                 stop_at=11.0)
    assert steps[1].start_postcopy and steps[1].phase == "stalled"
    assert steps[1].watch.in_postcopy
    # past the completion timeout, with a stop asked, no progress: post-copy is never aborted
    assert [s.abort for s in steps[2:]] == [None, None]
    assert [s.phase for s in steps[2:]] == ["post-copy", "post-copy"]


def test_the_completion_timeout_aborts_once() -> None:
    steps = _run(Policy(timeout_s=3.0, stall_s=100.0),
                 [(1.0, GIB - 1), (2.0, GIB - 2), (3.0, GIB - 3), (4.0, GIB - 4)])
    assert [s.abort for s in steps] == [None, None,
                                        "did not complete within 3s (1024 MiB guest)", None]
    assert steps[2].phase == "aborting" and steps[3].watch.aborted is not None


def test_no_progress_aborts() -> None:
    policy = Policy(progress_timeout_s=5.0, stall_s=100.0)
    steps = _run(policy, [(1.0, 100), (3.0, 100), (6.0, 100)])
    assert [s.abort for s in steps] == [None, None, "made no progress for 5s"]


def test_a_stop_asked_for_aborts_at_the_next_poll() -> None:
    steps = _run(POLICY, [(0.25, GIB - 1), (0.5, GIB - 2), (0.75, GIB - 3)], stop_at=0.5)
    assert [s.abort for s in steps] == [None, "stopped: cancelled", None]
    assert steps[1].notes == ("0.5s: aborting: stopped: cancelled",)


def test_before_the_copy_starts_nothing_counts_as_progress() -> None:
    # total 0: libvirt has not started copying; the progress clock runs from the start
    w = watch(Policy(progress_timeout_s=5.0, stall_s=100.0), 256, 0.0)
    first = step(w, Policy(progress_timeout_s=5.0, stall_s=100.0), 6.0, 0, 0)
    assert first.abort == "made no progress for 5s" and first.watch.best is None
