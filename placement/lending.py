"""How much of what a job holds it leaves idle, and when it wants it back: the owner model of
borrowing (docs/borrowing.md).

Pure. An SWF trace gives, per job, the processors it held (P) and its CPU time averaged over
them, hence the processors it kept busy on average, U = average CPU time x P / run time. It
does not say *when* in the run the idle share was idle. The model chosen here is the
two-phase job of Amdahl's law (Amdahl, "Validity of the single processor approach to
achieving large scale computing capabilities", AFIPS 1967): a serial phase on one processor
(set-up, input, a serial solver step), then a parallel phase on all P. The serial phase's
length s is the one that makes the average come out at the trace's U over the run T:

    1 x s + P x (T - s) = U x T   =>   s = T x (P - U) / (P - 1)

(U below 1: the whole run is serial). So every job keeps its trace's CPU time exactly, its
P - 1 other processors are idle during the serial phase, and at its end the owner needs them
all back at once — the give-back event. A job whose U is unknown, or at least P, or with
P = 1, leaves nothing idle.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from placement.cluster import Cluster
from placement.model import Allocation, NumaPolicy, Request
from placement.plans import Checkpoint, Migrate, Repin


@dataclass(frozen=True)
class OwnerUse:
    """When an owner's cores other than its first are idle: seconds after its start."""

    serial_s: int  # the serial phase: [0, serial_s) on one core; then all cores busy

    def lendable(self, lend_after_s: int) -> tuple[int, int] | None:
        """(from, until) seconds after the owner's start during which its idle cores may be
        lent, given that a core is lent only once idle for `lend_after_s`; None: never."""
        if self.serial_s <= lend_after_s:
            return None
        return lend_after_s, self.serial_s


def owner_use(procs: int, used_cpus: float, run_s: int) -> OwnerUse:
    """The two-phase model above for a job of `procs` processors that ran `run_s` seconds and
    kept `used_cpus` processors busy on average (-1: unknown). The serial phase is rounded
    down to a whole second, so the owner never gets its cores back later than the model says.
    """
    if procs < 2 or used_cpus < 0 or used_cpus >= procs or run_s <= 0:
        return OwnerUse(0)
    share = (procs - max(used_cpus, 1.0)) / (procs - 1)
    return OwnerUse(min(run_s, math.floor(share * run_s)))


# --- the daemon's side: lending measured idle cores (docs/borrowing.md, "In the daemon") ----

@dataclass(frozen=True)
class Loan:
    """Host cpu `cpu` of `host`, held by `owner`, on which `borrower` runs now."""

    borrower: str
    owner: str
    host: str
    cpu: int


def without_cpus(alloc: Allocation, cpus: Collection[int]) -> Allocation:
    """`alloc` as the engine counts it with `cpus` left out: the cpus a borrower runs on by
    loan (its owner holds them) or an owner's cpus lent in a lendable view. Memory, NICs and
    the guest's shape otherwise stay as they are."""
    if not cpus:
        return alloc
    gone = frozenset(cpus)
    return replace(alloc, cpus=tuple(c for c in alloc.cpus if c not in gone),
                   nodes=tuple(replace(s, cpus=tuple(c for c in s.cpus if c not in gone))
                               for s in alloc.nodes))


def lendable_cpus(owners: Mapping[str, Allocation], idle_s: Mapping[str, Sequence[float]],
                  for_s: float, lent: Collection[tuple[str, int]] = (),
                  ) -> dict[str, frozenset[int]]:
    """Which cpus each owner may lend now: owner -> host cpus.

    `owners`: the running jobs that may lend (not borrowers, not `--no-lend`), by allocation;
    `idle_s[job][i]`: how long vCPU i (pinned to `alloc.cpus[i]`) has stayed below the idle
    threshold, in seconds (0: busy now; a job without an entry was not measured yet and lends
    nothing). A cpu is lendable once idle for `for_s`, unless it is lent already (`lent`:
    (host, cpu)); vCPU 0 is never lent, as the simulator's model keeps an owner's first core
    (it is the one a mostly idle guest keeps waking: timer, console, its job's first thread).
    """
    taken = set(lent)
    found: dict[str, frozenset[int]] = {}
    for job_id, alloc in owners.items():
        idle = idle_s.get(job_id)
        if idle is None or len(idle) != len(alloc.cpus):
            continue
        cpus = frozenset(cpu for i, cpu in enumerate(alloc.cpus)
                         if i > 0 and idle[i] >= for_s and (alloc.host, cpu) not in taken)
        if cpus:
            found[job_id] = cpus
    return found


def lendable_view(cluster: Cluster, lendable: Mapping[str, Collection[int]]) -> Cluster:
    """A copy of `cluster` in which the `lendable` cpus (owner -> cpus) are free: where a
    borrower may be placed. Owners keep their memory and NICs (a borrower's memory comes
    from memory nobody holds). `cluster` is not changed. Raises UnknownJob for an owner the
    cluster does not hold."""
    view = cluster.copy()
    for job_id, cpus in lendable.items():
        alloc, request = view.allocation_of(job_id), view.request_of(job_id)
        view.release(job_id)
        view.reserve(job_id, without_cpus(alloc, cpus), request)
    return view


def place_borrower(cluster: Cluster, request: Request,
                   lendable: Mapping[str, Collection[int]],
                   owners: Mapping[str, Allocation]) -> tuple[Allocation, tuple[Loan, ...]] | None:
    """Where a borrower goes on lent cores: its allocation and the loans it takes (those of
    its cpus an owner holds), or None when even the lendable view has no room for it.

    The borrower is placed on one NUMA node (`numa: strict`): a lent core and the memory the
    borrower gets beside it are the owner's node's. It must take at least one lent core
    (otherwise it would fit on free cores, which the ordinary queue gives it)."""
    view = lendable_view(cluster, lendable)
    decision = view.place(replace(request, numa=NumaPolicy.STRICT, preemptible=True))
    alloc = decision.allocation
    if alloc is None:
        return None
    owner_of = {(owners[job].host, cpu): job for job, cpus in lendable.items() for cpu in cpus}
    loans = tuple(Loan("", owner_of[(alloc.host, cpu)], alloc.host, cpu)
                  for cpu in alloc.cpus if (alloc.host, cpu) in owner_of)
    return (alloc, loans) if loans else None


def give_back(loans: Iterable[Loan], busy: Mapping[str, Collection[int]],
              gone: Collection[str] = ()) -> dict[str, tuple[Loan, ...]]:
    """The loans to end now, by borrower: those on a cpu whose owner's vCPU there ran above
    the idle threshold in the last sample (`busy`: owner -> host cpus), and every loan of an
    owner in `gone` (resized, restarted, moved: its cores are no longer what was lent). A
    borrower with any such loan leaves all the lent cores it runs on: it moves as a whole."""
    ends: dict[str, list[Loan]] = {}
    wanted = {loan.borrower for loan in loans
              if loan.owner in gone or loan.cpu in busy.get(loan.owner, ())}
    for loan in loans:
        if loan.borrower in wanted:
            ends.setdefault(loan.borrower, []).append(loan)
    return {borrower: tuple(mine) for borrower, mine in sorted(ends.items())}


def move_for_give_back(cluster: Cluster, borrower: str, full: Allocation,
                       request: Request) -> Repin | Migrate | Checkpoint:
    """How a borrower leaves lent cores (docs/borrowing.md): first choice free cores of its
    own host with the same guest shape (a live re-pin: nothing crosses the network), then
    free cores on another host (a live migration), else a checkpoint (restored when it fits
    again). `cluster`: the engine's view, in which the borrower holds only what is not lent
    (`without_cpus`), or nothing; `full`: its whole allocation (what its guest runs on)."""
    view = cluster.copy()
    if borrower in view.allocations():
        view.release(borrower)
    shape = [(s.node, len(s.cpus), s.memory_mib) for s in full.nodes]
    numa = NumaPolicy.STRICT if len(full.nodes) == 1 else request.numa
    here = view.place(replace(request, host=full.host, numa=numa))
    if here.allocation is not None and \
            [(len(s.cpus), s.memory_mib) for s in here.allocation.nodes] == \
            [(n, m) for _node, n, m in shape]:
        return Repin(borrower, full.host, 0, here.allocation)
    away = view.place_within(replace(request, host=None), exclude=frozenset({full.host}))
    if away.allocation is not None:
        return Migrate(borrower, away.allocation.host, full.memory_mib, away.allocation)
    return Checkpoint(borrower, full.memory_mib)
