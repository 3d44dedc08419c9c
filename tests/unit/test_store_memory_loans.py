"""Memory loans in the store (borrow.memory: balloon; docs/borrowing.md "Borrowing memory"):
the owner keeps its memory, the engine counts the borrower without what it borrows, an owner
that leaves hands the memory over, a borrower that leaves ends its loans, a re-pinned owner
keeps lending on its node, and a store made before the table gets it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from placement import Allocation, NodeShare, Request
from placement.lending import Loan
from placement.memlending import MemoryLoan
from tests.unit.test_store import HOST, REQUEST, alloc, job
from vmjobs.jobs import JobState
from vmjobs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "spool" / "state.db")
    s.add_job(job("own"), Request(2, 768), alloc(0, 1, memory_mib=768), "placed")
    for borrower in ("b1", "b2"):
        s.add_job(job(borrower, JobState.QUEUED), REQUEST, None, "queued")
    yield s
    s.close()


def _borrow(store: Store, borrower: str, mib: int, cpu: int = 1,
            loans: tuple[Loan, ...] = ()) -> None:
    with store.reserving():
        store.assign(borrower, alloc(cpu, memory_mib=384), "borrowing", loans)
        store.lend_memory((MemoryLoan(borrower, "own", HOST, 0, mib),))


def _held(store: Store) -> dict[str, Allocation]:
    return {h.job_id: h.allocation for h in store.held()}


def test_a_memory_loan_leaves_the_owner_its_memory_and_the_borrower_less(store: Store) -> None:
    seq = store.last_change()
    _borrow(store, "b1", 128, loans=(Loan("b1", "own", HOST, 1),))
    assert store.memory_loans() == [MemoryLoan("b1", "own", HOST, 0, 128)]
    assert store.memory_loans("own") == store.memory_loans("b1") == store.memory_loans()
    assert store.memory_loans("b2") == []
    held = _held(store)
    assert held["own"].memory_mib == 768  # the owner holds all of its memory
    assert (held["b1"].memory_mib, held["b1"].nodes[0].memory_mib, held["b1"].cpus) == \
        (256, 256, ())  # 384 less the 128 borrowed, without the lent core
    holding = store.holding("b1")
    assert holding is not None and holding.allocation.memory_mib == 256
    assert store.job("b1").allocation["memory_mib"] == 384  # its guest's  # type: ignore[index]
    assert "b1" in store.changes_since(seq).jobs


def test_memory_is_lent_only_by_an_owner_holding_that_much_on_the_node(store: Store) -> None:
    for loan in (MemoryLoan("b1", "own", HOST, 0, 769),  # more than it holds
                 MemoryLoan("b1", "own", HOST, 1, 100),  # not on its node
                 MemoryLoan("b1", "own", "h2", 0, 100),  # not on its host
                 MemoryLoan("b1", "b2", HOST, 0, 100)):  # b2 holds nothing
        with pytest.raises(sqlite3.IntegrityError), store.reserving():
            store.assign("b1", alloc(2, memory_mib=384), "borrowing")
            store.lend_memory((loan,))
        assert store.job("b1").state == JobState.QUEUED  # rolled back  # type: ignore[union-attr]
    assert store.memory_loans() == []


def test_a_borrower_that_leaves_ends_its_memory_loans(store: Store) -> None:
    _borrow(store, "b1", 128, cpu=2)
    store.release("b1")
    assert store.memory_loans() == []
    assert _held(store)["own"].memory_mib == 768


def test_an_owner_that_leaves_hands_its_memory_to_the_borrower(store: Store) -> None:
    _borrow(store, "b1", 128, cpu=2)
    seq = store.last_change()
    store.release("own")
    assert store.memory_loans() == []
    assert _held(store)["b1"].memory_mib == 384  # it holds all of its memory now
    assert "b1" in store.changes_since(seq).jobs  # the live model re-reads its holding


def test_a_repinned_owner_keeps_lending_on_its_node_and_not_elsewhere(store: Store) -> None:
    _borrow(store, "b1", 128, cpu=2)
    store.repin_reservation("own", alloc(3, 4, memory_mib=768), "re-pinned")
    assert store.memory_loans() == [MemoryLoan("b1", "own", HOST, 0, 128)]
    on_node_1 = Allocation(HOST, (5, 6), 768, (NodeShare(1, (5, 6), 768),))
    store.repin_reservation("own", on_node_1, "re-pinned to node 1")
    assert store.memory_loans() == []  # its memory left node 0: the borrower holds its own
    assert _held(store)["b1"].memory_mib == 384


def test_a_store_made_before_memory_loans_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE memory_loans")
    db.commit()
    db.close()
    reopened = Store(path)
    assert reopened.memory_loans() == []
    reopened.close()
