"""Loans in the store (docs/borrowing.md): recorded beside reservations, never instead of the
owner's; a cpu carries one borrower at most; an owner that leaves hands the core over."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from placement import Request
from placement.lending import Loan
from tests.unit.test_store import HOST, REQUEST, alloc, job
from vmjobs.jobs import JobState
from vmjobs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "spool" / "state.db")
    s.add_job(job("own"), Request(2, 512), alloc(0, 1), "placed")
    for borrower in ("b1", "b2"):
        s.add_job(job(borrower, JobState.QUEUED), REQUEST, None, "queued")
    yield s
    s.close()


def _reservations(s: Store) -> dict[int, str]:
    return s.reserved_cpus(HOST)


def test_a_loan_is_recorded_beside_the_owners_reservation(store: Store) -> None:
    with store.reserving():
        store.assign("b1", alloc(1, memory_mib=256), "borrowing", (Loan("b1", "own", HOST, 1),))
    assert _reservations(store) == {0: "own", 1: "own"}  # the owner still holds cpu 1
    assert store.loans() == [Loan("b1", "own", HOST, 1)]
    assert store.loans("own") == store.loans("b1") == store.loans()
    assert store.loans("b2") == []
    held = {h.job_id: h.allocation for h in store.held()}
    assert held["own"].cpus == (0, 1)
    assert held["b1"].cpus == () and held["b1"].memory_mib == 256  # its memory is its own
    holding = store.holding("b1")
    assert holding is not None and holding.allocation.cpus == ()
    assert store.job("b1").allocation["cpus"] == [1]  # what its guest runs on  # type: ignore[index]


def test_a_cpu_carries_one_borrower_and_only_a_held_cpu_is_lent(store: Store) -> None:
    with store.reserving():
        store.assign("b1", alloc(1, memory_mib=256), "borrowing", (Loan("b1", "own", HOST, 1),))
    with pytest.raises(sqlite3.IntegrityError), store.reserving():
        store.assign("b2", alloc(1, memory_mib=256), "borrowing", (Loan("b2", "own", HOST, 1),))
    with pytest.raises(sqlite3.IntegrityError), store.reserving():  # cpu 5 is nobody's
        store.assign("b2", alloc(5, memory_mib=256), "borrowing", (Loan("b2", "own", HOST, 5),))
    with pytest.raises(sqlite3.IntegrityError), store.reserving():  # not b1's to lend
        store.assign("b2", alloc(0, memory_mib=256), "borrowing", (Loan("b2", "b1", HOST, 0),))
    assert store.job("b2").state == JobState.QUEUED  # type: ignore[union-attr]
    assert store.loans() == [Loan("b1", "own", HOST, 1)]


def test_a_borrower_that_leaves_ends_its_loans(store: Store) -> None:
    with store.reserving():
        store.assign("b1", alloc(1, memory_mib=256), "borrowing", (Loan("b1", "own", HOST, 1),))
    store.release("b1")
    assert store.loans() == [] and _reservations(store) == {0: "own", 1: "own"}


def test_an_owner_that_leaves_hands_its_lent_cores_to_the_borrower(store: Store) -> None:
    with store.reserving():
        store.assign("b1", alloc(1, memory_mib=256), "borrowing", (Loan("b1", "own", HOST, 1),))
    seq = store.last_change()
    store.release("own")
    assert store.loans() == []
    assert _reservations(store) == {1: "b1"}
    assert "b1" in store.changes_since(seq).jobs  # the live model re-reads its holding
    holding = store.holding("b1")
    assert holding is not None and holding.allocation.cpus == (1,)
