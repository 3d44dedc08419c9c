"""Borrowing in the daemon (docs/borrowing.md): lend cores running jobs hold and leave idle to
`--borrow` jobs, and give them back when their owners want them.

- **Lending** (`lend`, in each scheduling pass while `--borrow` jobs wait): the sampler
  follows how long each running job's vCPUs have used less than `borrow.idle_below` of a
  core; a core idle for `borrow.for` is lendable (placement.lending.lendable_cpus), unless
  its job is a borrower or said `--no-lend`. A waiting borrower is placed by the engine on
  the lendable view of the cluster (placement.lending.place_borrower) and its loans are
  recorded with its reservation, in one store transaction.
- **Giving back** (`check`, after every sample): when an owner's vCPU on a lent core ran
  above the threshold in the last sample (placement.lending.give_back), its borrower is
  moved off, on a thread of its own: a re-pin to free cores of its host, else a live
  migration to free cores elsewhere, else a checkpoint restored when it fits again
  (placement.lending.move_for_give_back). The owner is never paused or asked anything: it
  keeps its cores; the borrower, started at a CPU weight of 2 against the default 1024,
  shares them until it is gone.
- While loans exist, their owners are sampled at `Borrow.fast_interval_s` (`Daemon.sampler`): the
  give-back is seen within a quarter of `give_back_within`, leaving the rest for the move.

Owners that end, move or are checkpointed leave their lent cores to the borrower running
there (`Store._release`): nothing has to move then.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import replace

from placement import Checkpoint, Migrate, Repin
from placement.lending import Loan, give_back, lendable_cpus, move_for_give_back, place_borrower
from placement.memlending import MemoryLoan, place_borrower_with_memory
from vmjobs.codec import allocation_from_dict, request_from_dict
from vmjobs.daemon import memlending, moves
from vmjobs.daemon.core import Active, Daemon, Phase, time_limit_of
from vmjobs.errors import VmjobsError
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.snapshot import describe_allocation
from vmjobs.virt import VirtError
from vmjobs.virt.conn import lookup_domain
from vmjobs.virt.pinning import BORROWER_CPU_SHARES, DEFAULT_CPU_SHARES, set_cpu_shares

log = logging.getLogger("vmjobs.daemon")

def _is_borrower(record: JobRecord) -> bool:
    return bool(record.spec.get("borrow"))


def lending_owners(daemon: Daemon) -> list[tuple[str, str]]:
    """(owner, host) of the running jobs that lend cores now: the sampler reads them at the
    fast interval. Caller holds the lock."""
    owners = {(loan.owner, loan.host) for loan in daemon.store.loans()}
    running = set(daemon.running_guests())
    return sorted(owners & running)


def lend(daemon: Daemon, queue: list[tuple[JobRecord, object]]) -> list[str]:
    """Start the waiting `--borrow` jobs that fit on lent cores, in queue order; their ids.
    Caller holds the lock (after the scheduling pass, which gave free cores first)."""
    borrow = daemon.config.borrow
    waiting = [r for r, _q in queue if _is_borrower(r) and r.state == JobState.QUEUED]
    if borrow is None or not waiting:
        return []
    started: list[str] = []
    idle = daemon.sampler.idle_s()
    for record in waiting:
        owners = {}
        for job_id, _host in daemon.running_guests():
            held = daemon.store.job(job_id)
            if held is None or held.allocation is None or held.spec.get("no_lend") \
                    or _is_borrower(held):
                continue
            owners[job_id] = allocation_from_dict(held.allocation)
        lent = {(loan.host, loan.cpu) for loan in daemon.store.loans()}
        lendable = lendable_cpus(owners, idle, borrow.for_s, lent)
        memory = memlending.lendable(daemon, owners) if borrow.balloon else {}
        if not lendable and not memory:
            return started
        request = request_from_dict(record.request or {})
        try:
            with daemon.store.reserving():
                daemon.live.refresh()
                memory_loans: tuple[MemoryLoan, ...] = ()
                if borrow.balloon:  # memory too (docs/borrowing.md "Borrowing memory")
                    place = place_borrower_with_memory(daemon.live.cluster(), request,
                                                       lendable, memory, owners)
                    found = None if place is None else (place.allocation, place.loans)
                    memory_loans = () if place is None else tuple(
                        replace(m, borrower=record.id) for m in place.memory_loans)
                else:
                    found = place_borrower(daemon.live.cluster(), request, lendable, owners)
                if found is None:
                    continue
                alloc, loans = found
                loans = tuple(Loan(record.id, loan.owner, loan.host, loan.cpu)
                              for loan in loans)
                lenders = ", ".join(_describe(loan) for loan in (*loans, *memory_loans))
                daemon.store.assign(record.id, alloc, f"placed on lent "
                                    f"{'cores' if loans else 'memory'} ({lenders}): "
                                    f"{describe_allocation(alloc)}", loans)
                memlending.record(daemon, memory_loans)
                for loan in loans:
                    daemon.store.note(loan.owner, f"lends cpu {loan.cpu} to job {record.id} "
                                      f"(idle below {borrow.idle_below:g} of a core for "
                                      f"{borrow.for_s:g}s)")
        except sqlite3.IntegrityError as exc:
            # an owner left or was re-pinned meanwhile (another process's store change):
            # nothing was written; the next pass looks again
            log.info("job %s: the loan it was to get is gone: %s", record.id, exc)
            continue
        finally:
            daemon.live.refresh()
        daemon.forget_wait(record.id)
        daemon.admit(Active(record.id, alloc.host, time_limit_of(record)))
        daemon.spawn(_launch, daemon, record.id, name=f"launch-{record.id}", job_id=record.id)
        started.append(record.id)
        log.info("job %s: borrowing %s", record.id, lenders)
    if started:
        daemon.wake()
    return started


def _launch(daemon: Daemon, job_id: str) -> None:
    """Thread: start a borrower's guest, then lower its CPU weight so that an owner whose
    lent core it still shares gets nearly all of it until the borrower has moved (best
    effort: a refusal is logged; the give-back does not depend on it)."""
    daemon.launch(job_id)
    _weigh(daemon, job_id, BORROWER_CPU_SHARES)


def _weigh(daemon: Daemon, job_id: str, shares: int) -> None:
    """Set a running borrower's CPU weight, best effort (a refusal is logged)."""
    with daemon.lock:
        active = daemon.active.get(job_id)
        host = active.host if active is not None and active.phase == Phase.RUNNING else None
    conn = daemon.hosts.conn(host) if host is not None else None
    if conn is None:
        return
    try:
        dom = lookup_domain(conn, domain_name(job_id))
        if dom is not None:
            set_cpu_shares(dom, shares)
    except VirtError as exc:
        log.warning("job %s: could not set its CPU weight to %d: %s", job_id, shares,
                    exc.get_error_message())


def check(daemon: Daemon, sampled: set[str]) -> None:
    """After a sample: give back the lent cores whose owners want them (one mover per
    borrower), and let the scheduler look for lendable cores when borrowers wait."""
    borrow = daemon.config.borrow
    if borrow is None:
        return
    with daemon.lock:
        loans = daemon.store.loans()
        busy: dict[str, set[int]] = {}
        for owner in {loan.owner for loan in loans} & sampled:
            record = daemon.store.job(owner)
            if record is None or record.allocation is None:
                continue
            cpus = allocation_from_dict(record.allocation).cpus
            busy[owner] = {cpus[i] for i in daemon.sampler.busy_vcpus(owner) if i < len(cpus)}
        _send_off(daemon, give_back(loans, busy), "its owner uses it again")
        if any(_is_borrower(r) for r, _q in daemon.queued()):
            daemon.wake()  # idle times moved on: a waiting borrower may fit now


def owner_changed(daemon: Daemon, owner: str, why: str) -> None:
    """The owner's guest changes shape (resized, restarted): its borrowers leave its cores
    now, whatever its measured use. Call before changing the owner's reservation (a loan
    must stay on a cpu its owner holds). Caller holds the lock."""
    loans = daemon.store.loans(owner)
    _send_off(daemon, give_back(loans, {}, gone={owner}), why)


def before_resize(daemon: Daemon, job_id: str) -> None:
    """Refuse to resize a job with cores on loan (VmjobsError, one line): a loan must stay on
    a cpu its owner holds (the loans table's foreign key), so an owner's borrowers are sent
    off now and the resize can be asked again once they left; a borrower runs on cores that
    are not its own. Takes the lock."""
    with daemon.lock:
        loans = daemon.store.loans(job_id)
        memory = daemon.store.memory_loans(job_id)
        if any(loan.borrower == job_id for loan in loans):
            raise VmjobsError(f"job {job_id} runs on lent cores (--borrow); a borrower "
                              "cannot be resized")
        if any(loan.borrower == job_id for loan in memory):
            raise VmjobsError(f"job {job_id} runs on lent memory (--borrow); a borrower "
                              "cannot be resized")
        if loans or memory:
            owner_changed(daemon, job_id, "its owner is being resized")
            _send_off(daemon, {b: tuple(m for m in memory if m.borrower == b)
                               for b in sorted({m.borrower for m in memory})},
                      "its owner is being resized")
            lent = f"{len(loans)} of its cpus" if loans else \
                f"{sum(m.mib for m in memory)} MiB of its memory"
            raise VmjobsError(f"job {job_id} lends {lent} to borrowers; "
                              "they are being given back now: ask the resize again once "
                              "'vmjob show' lists no loans")


def _describe(loan: Loan | MemoryLoan) -> str:
    """A loan in events: "cpu 1 of job 3" or "128 MiB of job 3"."""
    if isinstance(loan, MemoryLoan):
        return f"{loan.mib} MiB of job {loan.owner}"
    return f"cpu {loan.cpu} of job {loan.owner}"


def check_memory(daemon: Daemon, sampled: set[str]) -> None:
    """After a sample, with `borrow.memory: balloon`: the borrowers of memory whose owner's
    spare fell below what it lends plus half the margin leave, by the cores' give-back path
    (placement.memlending.memory_give_back)."""
    borrow = daemon.config.borrow
    if borrow is None or not borrow.balloon:
        return
    with daemon.lock:
        ends = memlending.give_back(daemon, sampled)
        if ends:
            _send_off(daemon, ends, "its owner's memory use rose")


def _send_off(daemon: Daemon, ends: dict[str, tuple[Loan, ...]] | dict[str, tuple[MemoryLoan, ...]],
              why: str) -> None:
    """Start a mover for each borrower in `ends` that has none yet. Caller holds the lock."""
    for borrower, ending in ends.items():
        if not daemon.begin_leaving(borrower):
            continue  # its mover is at work
        wanted = ", ".join(_describe(loan) for loan in ending)
        daemon.store.note(borrower, f"giving back {wanted}: {why}")
        daemon.spawn(_leave, daemon, borrower, wanted, time.monotonic(),
                     name=f"give-back-{borrower}")


def _leave(daemon: Daemon, borrower: str, wanted: str, asked: float) -> None:
    """Thread: move `borrower` off lent cores (re-pin, migration, else checkpoint)."""
    try:
        with daemon.lock:
            record = daemon.store.job(borrower)
            active = daemon.active.get(borrower)
            if record is None or record.allocation is None or record.state != JobState.RUNNING \
                    or active is None or active.phase != Phase.RUNNING \
                    or not (daemon.store.loans(borrower)
                            or daemon.store.memory_loans(borrower)):
                return  # it ended, moves already, or its owner left the cores to it
            full = allocation_from_dict(record.allocation)
            action = move_for_give_back(daemon.live.cluster(), borrower, full,
                                        request_from_dict(record.request or {}))
        result = _carry_out(daemon, borrower, action)
        took = time.monotonic() - asked
        log.info("job %s: gave back %s: %s in %.1fs", borrower, wanted, result.action, took)
        with daemon.lock:
            if daemon.store.job(borrower) is not None:
                daemon.store.note(borrower, f"gave back {wanted}: {result.action} "
                                  f"{result.detail}; {took:.1f}s after the owner's use rose")
    except Exception:
        log.exception("job %s: giving back %s failed", borrower, wanted)
    finally:
        daemon.end_leaving(borrower)


def _carry_out(daemon: Daemon, borrower: str,
               action: Repin | Migrate | Checkpoint) -> moves.MoveResult:
    """The chosen move; a re-pin or migration that fails falls back to a checkpoint (the
    owner must get its cores back whatever happens)."""
    try:
        if isinstance(action, Repin):
            assert action.allocation is not None
            return moves.repin_job(daemon, borrower, action.allocation)
        if isinstance(action, Migrate):
            return moves.migrate(daemon, borrower, action.to_host, moves.policy_for(daemon))
    except VmjobsError as exc:
        log.warning("job %s: %s failed (%s); checkpointing it instead", borrower,
                    type(action).__name__.lower(), exc)
    # A save pauses the guest's vCPUs first; what then runs is QEMU writing its memory, in
    # the borrower's cgroup: at the borrower's low weight, behind a busy owner, that took
    # 4-5x as long (docs/borrowing.md). At the default weight it is over in ~2 s.
    _weigh(daemon, borrower, DEFAULT_CPU_SHARES)
    return moves.checkpoint_job(daemon, borrower, restore="auto")


def start_sampling(daemon: Daemon) -> threading.Thread:
    """The sampler thread, with lending owners read fast and give-backs checked after every
    sample when `borrow:` is set."""
    lending = daemon.config.borrow is not None

    def fast() -> list[tuple[str, str]]:
        if not lending:
            return []
        return sorted(set(lending_owners(daemon)) | set(memlending.lending_owners(daemon)))

    thread = threading.Thread(target=daemon.sampler.run, name="sampler", daemon=True,
                              args=(daemon.changed, lambda: daemon.stopping,
                                    daemon.running_guests, fast,
                                    (lambda jobs: (check(daemon, jobs),
                                                   check_memory(daemon, jobs)))
                                    if lending else (lambda _jobs: None)))
    thread.start()
    return thread
