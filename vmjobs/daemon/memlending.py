"""Borrowing memory in the daemon (`borrow.memory: balloon`; docs/borrowing.md "Borrowing
memory"): the measured side of placement/memlending.py.

- `lendable`: how much memory each possible owner may lend now, from its balloon readings
  over `borrow.for` (daemon/memuse.py) and the loans in force;
- `record`: a borrower's memory loans, in the store transaction that places it, with a note
  on each owner;
- `give_back`: the borrowers whose owners' memory use rose, after each sample (the movers are
  `daemon/lending.py`'s, as for cores);
- `lending_owners`: owners of memory loans, sampled at the lending owners' fast interval.

Without `memory: balloon` nothing here is called: borrowers get only free memory.
"""

from __future__ import annotations

import time

from placement import Allocation
from placement.memlending import MemoryLoan, lendable_memory, memory_give_back
from vmjobs.daemon.core import Daemon


def min_spare_mib(daemon: Daemon, job_ids: list[str]) -> dict[str, int]:
    """job -> its smallest spare (MiB) over `borrow.for`, for the jobs whose balloon readings
    cover that span (daemon/memuse.py)."""
    borrow = daemon.config.borrow
    assert borrow is not None
    now = time.monotonic()
    found: dict[str, int] = {}
    for job_id in job_ids:
        spare = daemon.sampler.memory.min_spare_kib(job_id, borrow.for_s, now)
        if spare is not None:
            found[job_id] = spare >> 10
    return found


def lendable(daemon: Daemon, owners: dict[str, Allocation]) -> dict[str, int]:
    """owner -> MiB it may lend now (placement.memlending.lendable_memory). Caller holds the
    lock; `owners`: the running jobs that may lend (not borrowers, not --no-lend)."""
    borrow = daemon.config.borrow
    assert borrow is not None
    return lendable_memory(owners, min_spare_mib(daemon, sorted(owners)),
                           borrow.memory_margin_mib, daemon.store.memory_loans())


def record(daemon: Daemon, loans: tuple[MemoryLoan, ...]) -> None:
    """Record a just-assigned borrower's memory loans, with a note on each owner. Caller is
    inside the `reserving()` that assigned it (an IntegrityError rolls it all back)."""
    borrow = daemon.config.borrow
    assert borrow is not None
    if not loans:
        return
    daemon.store.lend_memory(loans)
    for loan in loans:
        daemon.store.note(loan.owner, f"lends {loan.mib} MiB of node {loan.node} to job "
                          f"{loan.borrower} (its balloon reported at least "
                          f"{loan.mib + borrow.memory_margin_mib} MiB spare for "
                          f"{borrow.for_s:g}s)")


def lending_owners(daemon: Daemon) -> list[tuple[str, str]]:
    """(owner, host) of running jobs lending memory now. Caller holds the lock."""
    owners = {(loan.owner, loan.host) for loan in daemon.store.memory_loans()}
    return sorted(owners & set(daemon.running_guests()))


def give_back(daemon: Daemon, sampled: set[str]) -> dict[str, tuple[MemoryLoan, ...]]:
    """The memory loans to end now, by borrower: owners just sampled whose last spare reading
    fell below what they lend plus half the margin. Caller holds the lock."""
    borrow = daemon.config.borrow
    assert borrow is not None
    loans = [loan for loan in daemon.store.memory_loans() if loan.owner in sampled]
    spare: dict[str, int | None] = {}
    for owner in {loan.owner for loan in loans}:
        reading = daemon.sampler.memory.latest(owner)
        now = None if reading is None else reading.spare_now_kib
        spare[owner] = None if now is None else now >> 10
    return memory_give_back(loans, spare, borrow.memory_margin_mib)
