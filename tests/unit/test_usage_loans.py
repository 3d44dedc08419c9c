"""Usage accounting with loans (docs/borrowing.md): a lent core is counted once, for its owner,
while it is lent, and for the borrower once the owner has left it to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement import Request
from placement.lending import Loan
from tests.unit.test_store import HOST, REQUEST, alloc, job
from vmjobs import store as store_module
from vmjobs.jobs import JobState
from vmjobs.store import Store
from vmjobs.usage import load_rows, user_rows

T0 = 1_800_000_000.0


def test_a_lent_core_counts_once_and_passes_to_the_borrower_with_the_owners_exit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [T0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])
    s = Store(tmp_path / "state.db")
    s.add_job(job("own"), Request(2, 512), alloc(0, 1), "placed")
    s.transition("own", JobState.STARTING)
    s.transition("own", JobState.RUNNING)
    s.submit(job("b1", JobState.QUEUED), REQUEST, "queued")
    now[0] += 100
    with s.reserving():
        s.assign("b1", alloc(1, memory_mib=256), "borrowing", (Loan("b1", "own", HOST, 1),))
    s.transition("b1", JobState.STARTING)
    s.transition("b1", JobState.RUNNING)
    capacity = {HOST: {0: 2}}

    while_lent = {h.job_id: h for h in s.usage_histories(0)}
    assert [m.held.cpus if m.held else None for m in while_lent["b1"].marks] == \
        [None, 0, 0, 0]  # it runs on cpu 1, which its owner holds
    now[0] += 100
    (row,) = load_rows(list(while_lent.values()), capacity, now[0], T0)
    assert row.held_now == 2  # not 3: the lent core is the owner's

    # the owner ends: cpu 1 is the borrower's from then on, and its events say so
    s.transition("own", JobState.COMPLETED, "exit 0", release=True)
    b1 = s.job("b1")
    assert b1 is not None and b1.state == JobState.RUNNING
    now[0] += 100
    after = {h.job_id: h for h in s.usage_histories(0)}
    last = after["b1"].marks[-1]
    assert last.note and last.held is not None and last.held.cpus == 1
    assert any("cpu 1 of job own is its own now" in (e.reason or "")
               for e in s.events("b1"))
    (row,) = load_rows(list(after.values()), capacity, now[0], T0)
    assert row.held_now == 1
    # core-seconds over the 300 s: the owner 2 x 200, the borrower 1 x 100 (after the hand-over)
    (alice,) = user_rows(list(after.values()), now[0], T0)
    assert alice.core_hours == pytest.approx((2 * 200 + 1 * 100) / 3600)
    s.close()
