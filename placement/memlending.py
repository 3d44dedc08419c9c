"""Lending memory an owner holds and its balloon reports spare (`borrow.memory: balloon`,
docs/borrowing.md "Borrowing memory"). Pure: the daemon hands in what it measured.

The rule. An owner lends at most

    lendable = min(spare over the last `borrow.for`) - margin - what it lends already

(MiB, 0 if negative), where a sample's spare is min(the guest's MemAvailable, the guest's
memory - QEMU's resident memory on the host) (vmjobs/daemon/memuse.py). The minimum over
the whole window, like the idle window of a core, so a peak of use in it lends nothing; the
host-side resident bound, so memory the guest once touched (which stays resident on the host:
the balloon is never inflated) is never counted, and a guest reporting more than it has cannot
raise it; the margin, so the owner can grow by that much before its lent memory is at risk.
Only an owner on one NUMA node lends memory (its balloon speaks for the whole guest, not per
node), and a borrower takes it on that node, next to its lent cores (`numa: strict`).

Giving back: once an owner's spare (the last reading) falls below what it lends plus half the
margin, every borrower of its memory leaves (`memory_give_back`), by the same moves as a core's
give-back: the owner can still grow by half the margin before the host's memory is
overcommitted, which is what the give-back has to be quicker than.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from placement.cluster import Cluster
from placement.lending import Loan, without_cpus
from placement.model import Allocation, NumaPolicy, Request


@dataclass(frozen=True)
class MemoryLoan:
    """`mib` MiB of `owner`'s memory on `host`'s NUMA node `node`, used by `borrower`."""

    borrower: str
    owner: str
    host: str
    node: int
    mib: int


def without_memory(alloc: Allocation, mib: int) -> Allocation:
    """`alloc` with `mib` MiB less memory on its (one) node: an owner's lent memory in a
    lendable view, or a borrower's borrowed memory as the engine counts it. Raises ValueError
    for an allocation on several nodes or for more than it has."""
    if mib == 0:
        return alloc
    if len(alloc.nodes) != 1 or not 0 < mib <= alloc.nodes[0].memory_mib:
        raise ValueError(f"cannot take {mib} MiB from an allocation of {alloc.memory_mib} MiB "
                         f"on {len(alloc.nodes)} nodes")
    share = alloc.nodes[0]
    return replace(alloc, memory_mib=alloc.memory_mib - mib,
                   nodes=(replace(share, memory_mib=share.memory_mib - mib),))


def lendable_memory(owners: Mapping[str, Allocation], min_spare_mib: Mapping[str, int],
                    margin_mib: int, lent: Iterable[MemoryLoan] = ()) -> dict[str, int]:
    """owner -> MiB it may lend now, by the rule above (only positive amounts).

    `owners`: running jobs that may lend (not borrowers, not `--no-lend`), by allocation;
    `min_spare_mib[job]`: its smallest spare over `borrow.for` (a job without one — not
    covered yet, no balloon reading — lends nothing); `lent`: memory loans in force."""
    lends: dict[str, int] = {}
    for loan in lent:
        lends[loan.owner] = lends.get(loan.owner, 0) + loan.mib
    found: dict[str, int] = {}
    for job_id, alloc in owners.items():
        spare = min_spare_mib.get(job_id)
        if spare is None or len(alloc.nodes) != 1 or alloc.hugepage_kib:
            continue
        mib = min(spare - margin_mib, alloc.memory_mib) - lends.get(job_id, 0)
        if mib > 0:
            found[job_id] = mib
    return found


def lendable_view_with_memory(cluster: Cluster, cpus: Mapping[str, Collection[int]],
                              memory: Mapping[str, int]) -> Cluster:
    """A copy of `cluster` in which the lendable `cpus` (owner -> host cpus) and `memory`
    (owner -> MiB) are free. `cluster` is not changed. Raises UnknownJob for an owner the
    cluster does not hold."""
    view = cluster.copy()
    for job_id in sorted(set(cpus) | set(memory)):
        alloc, request = view.allocation_of(job_id), view.request_of(job_id)
        view.release(job_id)
        view.reserve(job_id, without_memory(without_cpus(alloc, cpus.get(job_id, ())),
                                            memory.get(job_id, 0)), request)
    return view


@dataclass(frozen=True)
class BorrowerPlace:
    """Where a borrower goes: its whole allocation, the cores it runs on by loan and the
    memory it uses by loan (borrower "" in both: the caller names it)."""

    allocation: Allocation
    loans: tuple[Loan, ...]
    memory_loans: tuple[MemoryLoan, ...]


def place_borrower_with_memory(cluster: Cluster, request: Request,
                               cpus: Mapping[str, Collection[int]], memory: Mapping[str, int],
                               owners: Mapping[str, Allocation]) -> BorrowerPlace | None:
    """Where a borrower goes on lent cores and lent memory, or None when even the lendable
    view has no room or the place borrows nothing (free cores and free memory: the ordinary
    queue's). On one NUMA node (`numa: strict`). It uses the node's free memory first and
    borrows only the rest, from the owners lending the most first (fewest owners whose rise
    would send it away); the memory loans sum to exactly what it borrows."""
    view = lendable_view_with_memory(cluster, cpus, memory)
    decision = view.place(replace(request, numa=NumaPolicy.STRICT, preemptible=True))
    alloc = decision.allocation
    if alloc is None or len(alloc.nodes) != 1:
        return None
    owner_of = {(owners[job].host, cpu): job for job, lent in cpus.items() for cpu in lent}
    loans = tuple(Loan("", owner_of[(alloc.host, cpu)], alloc.host, cpu)
                  for cpu in alloc.cpus if (alloc.host, cpu) in owner_of)
    node = alloc.nodes[0].node
    free = next(n.memory_free_mib for n in cluster.free(alloc.host).nodes if n.node == node)
    short = max(0, alloc.nodes[0].memory_mib - free)
    memory_loans: list[MemoryLoan] = []
    lenders = sorted(((mib, job) for job, mib in memory.items()
                      if owners[job].host == alloc.host and owners[job].nodes[0].node == node),
                     key=lambda pair: (-pair[0], pair[1]))
    for mib, job in lenders:
        if short == 0:
            break
        take = min(mib, short)
        memory_loans.append(MemoryLoan("", job, alloc.host, node, take))
        short -= take
    if short > 0:  # the view had no more than this: cannot happen, but never lend what is not
        return None
    if not loans and not memory_loans:
        return None
    return BorrowerPlace(alloc, loans, tuple(memory_loans))


def memory_give_back(loans: Iterable[MemoryLoan], spare_mib: Mapping[str, int | None],
                     margin_mib: int) -> dict[str, tuple[MemoryLoan, ...]]:
    """The memory loans to end now, by borrower: every loan of an owner whose last spare
    reading (`spare_mib[owner]`, MiB) is below what it lends plus half the margin. An owner
    without a reading now (None, or absent: its balloon stopped reporting) keeps its loans
    until it has one; the host-side part of its spare is read with every sample, so a guest
    that stops reporting is judged on its resident memory (see vmjobs/daemon/memuse.py)."""
    loans = list(loans)
    lends: dict[str, int] = {}
    for loan in loans:
        lends[loan.owner] = lends.get(loan.owner, 0) + loan.mib
    wanted = {owner for owner, mib in lends.items()
              if (spare := spare_mib.get(owner)) is not None and spare < mib + margin_mib // 2}
    ends: dict[str, list[MemoryLoan]] = {}
    for loan in loans:
        if loan.owner in wanted:
            ends.setdefault(loan.borrower, []).append(loan)
    return {borrower: tuple(mine) for borrower, mine in sorted(ends.items())}
