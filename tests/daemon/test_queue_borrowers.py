"""A waiting `--borrow` job in the queue policy (docs/borrowing.md, "Lending"): it starts on
free cores when they fit it now without delaying a head, and otherwise waits held — never
first in line, so it neither blocks the jobs behind it nor takes a head's future cores."""

from __future__ import annotations

import placement
from placement import Request
from tests.daemon.test_queue import NOW, hold, host, started, wait
from vmjobs.daemon.queue import BORROWER_WAITS, Holding, Waiting, plan


def borrow(job_id: str, cpus: int, limit: float | None = None) -> Waiting:
    return Waiting(job_id, Request(cpus=cpus, memory_mib=256, preemptible=True), limit,
                   borrower=True)


def test_a_borrower_that_fits_starts_like_any_job() -> None:
    result = plan(placement.Cluster([host(cpus=2)]), [borrow("b", 1), wait("j", 1)], [], NOW)
    assert started(result) == ["b", "j"]


def test_a_borrower_that_does_not_fit_is_never_the_head_and_blocks_no_one() -> None:
    cluster = placement.Cluster([host(cpus=4)])
    hold(cluster, "r", 2)  # ends in 100 s
    holding = [Holding("r", NOW + 100)]
    # the borrower is first in queue order and does not fit; the 2-cpu job behind it starts,
    # and the 3-cpu job after that is the head (an ordinary job would have been, and would
    # have kept the 2-cpu job from starting on cores it needs at its shadow time)
    queue = [borrow("b", 3), wait("small", 2), wait("big", 3)]
    result = plan(cluster, queue, holding, NOW)
    assert started(result) == ["small"]
    waits = {w.job_id: w for w in result.waits}
    assert waits["big"].position == 1 and not waits["big"].held
    assert waits["b"].held and waits["b"].position == 2  # numbered after the head
    assert waits["b"].reason.startswith(BORROWER_WAITS + "; now: ")
    assert "first in line" in waits["big"].reason


def test_a_borrower_never_takes_cores_a_head_is_due_to_get() -> None:
    cluster = placement.Cluster([host(cpus=4)])
    hold(cluster, "r", 2)  # ends in 100 s
    holding = [Holding("r", NOW + 100)]
    # the head needs all 4 cpus at 100 s: a borrower without a limit must not take the 2
    # free ones now (it would delay the head), and it does not become a head itself
    result = plan(cluster, [wait("big", 4), borrow("b", 2)], holding, NOW)
    assert started(result) == []
    waits = {w.job_id: w for w in result.waits}
    assert waits["big"].position == 1
    assert waits["b"].held and "would delay big" in waits["b"].reason
    # one that ends before the head is due is backfilled as any job
    result = plan(cluster, [wait("big", 4), borrow("b", 2, limit=50)], holding, NOW)
    assert started(result) == ["b"]
