"""The state store: jobs, their reservations and their events, in SQLite (WAL).

Double booking is impossible by construction: a row per (host, cpu) and per (host, device)
under a primary key, written in the same transaction as the job's state change. Memory has no
row per MiB, so placements are decided inside `reserving()`, which holds SQLite's write lock
from reading what is held to writing the new reservation.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from placement import Allocation, Request
from placement.lending import Loan, without_cpus
from placement.memlending import MemoryLoan, without_memory
from vmjobs.codec import (
    allocation_from_dict,
    allocation_to_dict,
    request_from_dict,
    request_to_dict,
)
from vmjobs.errors import VmjobsError
from vmjobs.jobs import UNFINISHED, JobRecord, JobState, Kind, check_transition
from vmjobs.usage import Holding, JobHistory, Mark

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    uid INTEGER NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    request TEXT NOT NULL,
    host TEXT,
    allocation TEXT,
    exit_code INTEGER,
    message TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'job',  -- 'job' or 'reservation' (jobs.Kind)
    key_hash TEXT,  -- a reservation's key, hashed (vmjobs.holdkey); never shown
    inside TEXT  -- the held reservation a job runs inside
);
CREATE TABLE IF NOT EXISTS cpu_reservations (
    host TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    user_id TEXT,  -- a held reservation's row: the job inside it that uses the cpu now
    PRIMARY KEY (host, cpu)
);
CREATE TABLE IF NOT EXISTS device_reservations (
    host TEXT NOT NULL,
    address TEXT NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    user_id TEXT,  -- as cpu_reservations.user_id
    PRIMARY KEY (host, address)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    time REAL NOT NULL,
    state TEXT NOT NULL,
    host TEXT,
    reason TEXT,
    note INTEGER NOT NULL DEFAULT 0,
    held TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS cordons (
    host TEXT PRIMARY KEY,
    reason TEXT,
    time REAL NOT NULL
);
-- Loans (docs/borrowing.md): a borrower runs on a cpu its owner holds and leaves idle. The
-- cpu stays the owner's reservation (cpu_reservations is untouched: the UNIQUE (host, cpu)
-- rule stays true for owners); the key makes a cpu carry at most one borrower, the foreign
-- key makes a loan exist only on a reserved cpu.
CREATE TABLE IF NOT EXISTS loans (
    host TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    borrower TEXT NOT NULL REFERENCES jobs(id),
    owner TEXT NOT NULL REFERENCES jobs(id),
    since REAL NOT NULL,
    PRIMARY KEY (host, cpu),
    FOREIGN KEY (host, cpu) REFERENCES cpu_reservations(host, cpu)
);
-- Memory loans (borrow.memory: balloon; docs/borrowing.md "Borrowing memory"): a borrower uses
-- `mib` of memory its owner holds on a NUMA node and its balloon reports spare. Memory has no
-- rows (it is counted by the engine under the store's write lock); the owner's allocation
-- keeps the memory, the borrower's is counted without it (`Store.held`). A new table: a
-- store written before it gets it when opened.
CREATE TABLE IF NOT EXISTS memory_loans (
    borrower TEXT NOT NULL REFERENCES jobs(id),
    owner TEXT NOT NULL REFERENCES jobs(id),
    host TEXT NOT NULL,
    node INTEGER NOT NULL,
    mib INTEGER NOT NULL CHECK (mib > 0),
    since REAL NOT NULL,
    PRIMARY KEY (borrower, owner)
);
-- Gangs' control state that must outlive the daemon (vmjobs/control.py `durable`: kv, baton
-- holders, barrier rounds, poison, remembered answers), written by vmjobs/controljournal.py
-- and removed when the gang ends. Keyed by the gang's id (its members are GANG.i jobs).
CREATE TABLE IF NOT EXISTS gang_control (
    gang_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (gang_id, kind, name)
);
"""

# Indexes for every query the daemon makes per request or per pass, so each costs O(answer),
# not O(table). Created on open, so a spool written before them gets them then.
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
CREATE INDEX IF NOT EXISTS jobs_uid ON jobs(uid, state, created);
CREATE INDEX IF NOT EXISTS jobs_held ON jobs(created) WHERE allocation IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_host ON jobs(host, state);
CREATE INDEX IF NOT EXISTS cpu_reservations_job ON cpu_reservations(job_id);
CREATE INDEX IF NOT EXISTS device_reservations_job ON device_reservations(job_id);
CREATE INDEX IF NOT EXISTS loans_borrower ON loans(borrower);
CREATE INDEX IF NOT EXISTS loans_owner ON loans(owner);
CREATE INDEX IF NOT EXISTS memory_loans_owner ON memory_loans(owner);
CREATE INDEX IF NOT EXISTS jobs_inside ON jobs(inside, state) WHERE inside IS NOT NULL;
CREATE INDEX IF NOT EXISTS cpu_reservations_user ON cpu_reservations(user_id)
    WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS device_reservations_user ON device_reservations(user_id)
    WHERE user_id IS NOT NULL;
"""

# The change log: a row for every job whose allocation changes (placed, released, moved,
# re-pinned, created or deleted holding something), every host cordoned or uncordoned, and
# every job that enters or leaves the queue, written by triggers, so every writer shows up in
# it — the daemon's connection, a mover's own connection, a direct `vmjob run` in another
# process, an older vmjobs — and a rolled-back transaction leaves nothing. The daemon's live
# models (`vmjobs.daemon.live`) read it from the last row they applied, O(changes).
CHANGES = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    host TEXT,
    queue INTEGER NOT NULL DEFAULT 0  -- 1: the job entered or left the queue
);
CREATE TRIGGER IF NOT EXISTS changes_queue_insert AFTER INSERT ON jobs
    WHEN NEW.state = 'QUEUED'
    BEGIN INSERT INTO changes (job_id, queue) VALUES (NEW.id, 1); END;
CREATE TRIGGER IF NOT EXISTS changes_queue_update AFTER UPDATE OF state ON jobs
    WHEN (OLD.state = 'QUEUED') <> (NEW.state = 'QUEUED')
    BEGIN INSERT INTO changes (job_id, queue) VALUES (NEW.id, 1); END;
CREATE TRIGGER IF NOT EXISTS changes_queue_delete AFTER DELETE ON jobs
    WHEN OLD.state = 'QUEUED'
    BEGIN INSERT INTO changes (job_id, queue) VALUES (OLD.id, 1); END;
CREATE TRIGGER IF NOT EXISTS changes_job_insert AFTER INSERT ON jobs
    WHEN NEW.allocation IS NOT NULL
    BEGIN INSERT INTO changes (job_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS changes_job_update AFTER UPDATE OF allocation ON jobs
    WHEN OLD.allocation IS NOT NEW.allocation
    BEGIN INSERT INTO changes (job_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS changes_job_delete AFTER DELETE ON jobs
    WHEN OLD.allocation IS NOT NULL
    BEGIN INSERT INTO changes (job_id) VALUES (OLD.id); END;
CREATE TRIGGER IF NOT EXISTS changes_cordon_insert AFTER INSERT ON cordons
    BEGIN INSERT INTO changes (host) VALUES (NEW.host); END;
CREATE TRIGGER IF NOT EXISTS changes_cordon_delete AFTER DELETE ON cordons
    BEGIN INSERT INTO changes (host) VALUES (OLD.host); END;
"""


@dataclass(frozen=True)
class Event:
    job_id: str
    time: float
    state: JobState
    host: str | None
    reason: str | None
    note: bool = False  # a note (`Store.note`): `state` is the state it was made in, unchanged


@dataclass(frozen=True)
class Held:
    job_id: str
    allocation: Allocation
    request: Request


@dataclass
class Changes:
    """What the change log holds after a sequence number."""

    last: int  # the latest sequence number read
    jobs: set[str] = field(default_factory=set)  # whose holding changed
    hosts: set[str] = field(default_factory=set)  # cordoned or uncordoned
    queue: set[str] = field(default_factory=set)  # entered or left the queue


STORE_MODE = 0o600


def _make_private(path: Path) -> None:
    """The store holds every job's argv and environment: root's alone. Create it 0600 before
    SQLite opens it (SQLite gives its -wal and -shm files the main file's mode) and narrow
    the files of a store made before this rule.

    An existing store file is never opened here: closing any descriptor of a file drops every
    POSIX lock this process holds on it, including those of SQLite connections the process
    already has (the daemon's own, when a mover opens a second one). SQLite then takes itself
    for the last user, checkpoints and resets the WAL under the other connection, whose
    later commits land in a file nobody reads: a job's end recorded, logged and lost."""
    if not path.exists():
        with suppress(FileExistsError):  # another process made it meanwhile
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, STORE_MODE))
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", STORE_MODE)


class Store:
    """One connection to the store file; each process opens its own."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        """`shared`: the connection may be used from several threads (the daemon), each use
        serialized by the caller's lock."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # e.g. a spool the user may not write: one line, not a traceback
            raise VmjobsError(f"cannot open the state store {path}: {exc.strerror}") from None
        try:
            _make_private(path)
            self.db = sqlite3.connect(path, timeout=60, isolation_level=None,
                                      check_same_thread=not shared)
        except OSError as exc:
            raise VmjobsError(f"cannot open the state store {path}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise VmjobsError(f"cannot open the state store {path}: {exc}") from None
        self.db.row_factory = sqlite3.Row
        self._setup(path)

    def _setup(self, path: Path) -> None:
        # Switching a new file to WAL can fail with "database is locked" at once, without
        # waiting for the busy timeout, while another process does the same: two `vmjob run`
        # started together on a fresh spool. Retry that for as long as a lock may be waited for.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.db.execute("PRAGMA busy_timeout=60000")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self.db.executescript(SCHEMA)
                self._upgrade()
                self.db.executescript(INDEXES + CHANGES)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    self.db.close()
                    raise VmjobsError(f"cannot open the state store {path}: {exc}") from None
            time.sleep(0.05)

    def _upgrade(self) -> None:
        """Bring a store written by an older vmjobs to this schema; its records stay readable."""
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(events)")}
        # before notes existed, a note was an event repeating the job's state; before usage
        # accounting, events did not say what the job held (`held` NULL: counted as nothing)
        for column, kind in (("note", "INTEGER NOT NULL DEFAULT 0"), ("held", "TEXT")):
            if column in columns:
                continue
            try:
                self.db.execute(f"ALTER TABLE events ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process upgraded it first
                    raise
        # held reservations (issue 11): what a row is, a reservation's key, the reservation
        # a job runs inside, and who uses a reservation's cpu or NIC now
        for table, column, kind in (("jobs", "kind", "TEXT NOT NULL DEFAULT 'job'"),
                                    ("jobs", "key_hash", "TEXT"), ("jobs", "inside", "TEXT"),
                                    ("cpu_reservations", "user_id", "TEXT"),
                                    ("device_reservations", "user_id", "TEXT")):
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column in have:
                continue
            try:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
        # made here, not in SCHEMA, so that it follows the `held` column on an old store
        self.db.execute("CREATE INDEX IF NOT EXISTS events_time ON events(time)")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def reserving(self) -> Iterator[Store]:
        """Hold the write lock: read what is held, decide, reserve — nobody else in between.

        Inside another `reserving()` it joins that transaction (which commits or rolls back
        everything), so many changes can be one transaction: cancelling 100 queued jobs costs
        one commit, not 100 (~1.6 ms each here)."""
        if self.db.in_transaction:
            yield self
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[Store]:
        """One consistent view for several reads (a WAL read transaction); inside another
        transaction, that one's view."""
        if self.db.in_transaction:
            yield self
            return
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("COMMIT")

    def held(self) -> list[Held]:
        """What every holder holds, oldest first, as the engine counts it: jobs and held
        reservations. Jobs running inside a reservation are left out: the reservation holds
        their share of the host. A borrower is counted without the cpus it runs on by loan
        (their owners hold them)."""
        with self.reading():
            rows = list(self.db.execute(
                "SELECT id, allocation, request FROM jobs WHERE allocation IS NOT NULL"
                " AND inside IS NULL ORDER BY created"))
            lent: dict[str, list[int]] = {}
            for loan in self.db.execute("SELECT borrower, cpu FROM loans"):
                lent.setdefault(loan["borrower"], []).append(loan["cpu"])
            borrowed = {r["borrower"]: r["mib"] for r in self.db.execute(
                "SELECT borrower, SUM(mib) AS mib FROM memory_loans GROUP BY borrower")}
        return [_held(r, lent.get(r["id"], ()), borrowed.get(r["id"], 0)) for r in rows]

    def holders(self) -> list[JobRecord]:
        """Every job (or other row of `jobs`, e.g. a held reservation) that holds cpus,
        memory or NICs now, oldest first (index `jobs_held`)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE allocation IS NOT NULL ORDER BY created")
        return [_record(r) for r in rows]

    def holding(self, job_id: str) -> Held | None:
        """What one job holds now, as `held` counts it; None if it holds nothing (or does not
        exist, or runs inside a reservation, which holds its share: see `held`)."""
        with self.reading():
            row = self.db.execute("SELECT id, allocation, request FROM jobs WHERE id = ? AND "
                                  "allocation IS NOT NULL AND inside IS NULL",
                                  (job_id,)).fetchone()
            lent = [r["cpu"] for r in self.db.execute(
                "SELECT cpu FROM loans WHERE borrower = ?", (job_id,))]
            borrowed = self.db.execute("SELECT COALESCE(SUM(mib), 0) FROM memory_loans "
                                       "WHERE borrower = ?", (job_id,)).fetchone()[0]
        return _held(row, lent, borrowed) if row else None

    # --- loans (docs/borrowing.md) -------------------------------------------------------------

    def loans(self, job_id: str | None = None) -> list[Loan]:
        """Every loan, or those where `job_id` is the borrower or the owner; by host, cpu."""
        where, args = ("WHERE borrower = ? OR owner = ?", (job_id, job_id)) \
            if job_id is not None else ("", ())
        return [Loan(r["borrower"], r["owner"], r["host"], r["cpu"]) for r in self.db.execute(
            f"SELECT * FROM loans {where} ORDER BY host, cpu", args)]

    def memory_loans(self, job_id: str | None = None) -> list[MemoryLoan]:
        """Every memory loan, or those where `job_id` borrows or lends; by host, owner."""
        where, args = ("WHERE borrower = ? OR owner = ?", (job_id, job_id)) \
            if job_id is not None else ("", ())
        return [MemoryLoan(r["borrower"], r["owner"], r["host"], r["node"], r["mib"])
                for r in self.db.execute(
                    f"SELECT * FROM memory_loans {where} ORDER BY host, owner, borrower", args)]

    def lend_memory(self, loans: tuple[MemoryLoan, ...]) -> None:
        """Record memory loans of a borrower just assigned (call inside the `reserving()`
        that assigned it). sqlite3.IntegrityError (nothing written by this call; the caller
        rolls back) when an owner no longer runs on the loan's host and node with at least
        that much memory, or a borrower does not hold the loan's host."""
        now = time.time()
        for loan in loans:
            owner = self.db.execute("SELECT allocation FROM jobs WHERE id = ? AND host = ? "
                                    "AND allocation IS NOT NULL", (loan.owner, loan.host)
                                    ).fetchone()
            borrower = self.db.execute("SELECT 1 FROM jobs WHERE id = ? AND host = ? "
                                       "AND allocation IS NOT NULL", (loan.borrower, loan.host)
                                       ).fetchone()
            share = [n for n in allocation_from_dict(json.loads(owner["allocation"])).nodes
                     if n.node == loan.node] if owner is not None else []
            if borrower is None or len(share) != 1 or share[0].memory_mib < loan.mib:
                raise sqlite3.IntegrityError(f"job {loan.borrower}: the memory of job "
                                             f"{loan.owner} it was to borrow is gone")
        self.db.executemany(
            "INSERT INTO memory_loans (borrower, owner, host, node, mib, since) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(loan.borrower, loan.owner, loan.host, loan.node, loan.mib, now) for loan in loans])
        # the borrower's holding as the engine counts it changed (less memory)
        self.db.executemany("INSERT INTO changes (job_id) VALUES (?)",
                            [(b,) for b in sorted({loan.borrower for loan in loans})])

    def loan_since(self) -> dict[tuple[str, int], float]:
        """(host, cpu) -> when its loan began (Unix s)."""
        return {(r["host"], r["cpu"]): r["since"]
                for r in self.db.execute("SELECT host, cpu, since FROM loans")}

    # --- the change log of holdings (see CHANGES) ---------------------------------------------

    def last_change(self) -> int:
        """The sequence number of the latest change of holdings or cordons (0: none yet)."""
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def changes_since(self, seq: int) -> Changes:
        """What changed after `seq` (see CHANGES)."""
        found = Changes(seq)
        for row in self.db.execute("SELECT seq, job_id, host, queue FROM changes WHERE seq > ?"
                                   " ORDER BY seq", (seq,)):
            found.last = row["seq"]
            if row["queue"]:
                found.queue.add(row["job_id"])
            elif row["job_id"] is not None:
                found.jobs.add(row["job_id"])
            if row["host"] is not None:
                found.hosts.add(row["host"])
        return found

    def queued_job(self, job_id: str) -> tuple[JobRecord, Request] | None:
        """The job and its request if it is QUEUED now."""
        row = self.db.execute("SELECT * FROM jobs WHERE id = ? AND state = ?",
                              (job_id, JobState.QUEUED.value)).fetchone()
        return (_record(row), request_from_dict(json.loads(row["request"]))) if row else None

    def forget_changes(self, upto: int) -> None:
        """Drop the change log up to `upto` (applied by its only reader, the daemon)."""
        self.db.execute("DELETE FROM changes WHERE seq <= ?", (upto,))

    def cordon_of(self, host: str) -> str | None:
        """Why `host` is cordoned; None if it is not."""
        row = self.db.execute("SELECT reason FROM cordons WHERE host = ?", (host,)).fetchone()
        return None if row is None else row["reason"] or ""

    def add_job(self, job: JobRecord, request: Request, allocation: Allocation | None,
                reason: str, key_hash: str | None = None) -> None:
        """Insert a job (or a reservation, `job.kind`, with its hashed key) and, when placed,
        its reservation: all of it or, on a conflict, nothing.

        Call inside `reserving()` when the allocation was decided from what `held()` said.
        """
        check_transition(job.id, None, job.state, job.kind)
        now = time.time()
        # A savepoint makes the inserts one unit even outside `reserving()`: a reservation that
        # hits the UNIQUE key must not leave the job row (and its claimed allocation) behind.
        self.db.execute("SAVEPOINT add_job")
        try:
            self.db.execute(
                "INSERT INTO jobs (id, owner, uid, state, spec, request, host, allocation,"
                " created, updated, kind, key_hash, inside)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.owner, job.uid, job.state.value, json.dumps(job.spec),
                 json.dumps(request_to_dict(request)), allocation.host if allocation else None,
                 json.dumps(allocation_to_dict(allocation)) if allocation else None, now, now,
                 job.kind.value, key_hash, job.inside),
            )
            if allocation:
                self._insert_reservation(job.id, allocation)
            self._event(job.id, job.state, allocation.host if allocation else None, reason, now)
        except BaseException:
            self.db.execute("ROLLBACK TO add_job")
            self.db.execute("RELEASE add_job")
            raise
        self.db.execute("RELEASE add_job")

    def _insert_reservation(self, job_id: str, alloc: Allocation,
                            loans: tuple[Loan, ...] = ()) -> None:
        """`loans`: cpus of `alloc` the job runs on by loan: a row in `loans` each instead
        of a reservation (the owner's row stays)."""
        lent = {loan.cpu for loan in loans}
        self.db.executemany(
            "INSERT INTO cpu_reservations (host, cpu, job_id) VALUES (?, ?, ?)",
            [(alloc.host, cpu, job_id) for cpu in (*alloc.cpus, *alloc.idle_cpus)
             if cpu not in lent],
        )
        now = time.time()
        self.db.executemany(
            "INSERT INTO loans (host, cpu, borrower, owner, since) SELECT ?, ?, ?, ?, ? "
            "FROM cpu_reservations WHERE host = ? AND cpu = ? AND job_id = ?",
            [(alloc.host, loan.cpu, job_id, loan.owner, now, alloc.host, loan.cpu, loan.owner)
             for loan in loans])
        if self.db.execute("SELECT COUNT(*) FROM loans WHERE borrower = ?",
                           (job_id,)).fetchone()[0] != len(loans):
            # the owner no longer holds one of them: no loan at all (the caller rolls back)
            raise sqlite3.IntegrityError(f"job {job_id}: a lent cpu is no longer its owner's")
        self.db.executemany(
            "INSERT INTO device_reservations (host, address, job_id) VALUES (?, ?, ?)",
            [(alloc.host, dev, job_id) for dev in alloc.devices],
        )

    def _event(self, job_id: str, state: JobState, host: str | None, reason: str | None,
               now: float, note: bool = False) -> None:
        # `held`: the job's reservation as it stands after this event (a copy of its
        # allocation, NULL when it holds nothing), so usage accounting (`vmjobs.usage`) can
        # replay who held what when from the events alone, after the rows are freed.
        self.db.execute(
            "INSERT INTO events (job_id, time, state, host, reason, note, held)"
            # a job inside a reservation holds nothing of its own: the reservation's events
            # carry what is held (usage would count it twice otherwise)
            " SELECT ?, ?, ?, ?, ?, ?, CASE WHEN inside IS NULL THEN allocation END"
            " FROM jobs WHERE id = ?",
            (job_id, now, state.value, host, reason, int(note), job_id),
        )
        # a borrower does not hold the cpus it runs on by loan: their owners do, and their
        # events count them (usage would count a lent core twice otherwise)
        lent = [r["cpu"] for r in self.db.execute("SELECT cpu FROM loans WHERE borrower = ?",
                                                  (job_id,))]
        if lent:
            row = self.db.execute("SELECT allocation FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
            if row is not None and row["allocation"]:
                held = without_cpus(allocation_from_dict(json.loads(row["allocation"])), lent)
                self.db.execute("UPDATE events SET held = ? WHERE id = last_insert_rowid()",
                                (json.dumps(allocation_to_dict(held)),))

    def _current(self, job_id: str) -> sqlite3.Row:
        row = self.db.execute("SELECT state, host, kind, inside FROM jobs WHERE id = ?",
                              (job_id,)).fetchone()
        if row is None:
            raise VmjobsError(f"unknown job {job_id!r}")
        return row

    def transition(self, job_id: str, state: JobState, reason: str | None = None, *,
                   release: bool = False, exit_code: int | None = None) -> None:
        """Change a job's state, with its event, and optionally free what it holds — atomically.

        Raises `IllegalTransition` (a bug) when `jobs.TRANSITIONS` does not allow the change,
        including to the state the job is already in (use `note` for that), and VmjobsError
        for an unknown job.
        """
        now = time.time()
        with self.reserving():
            row = self._current(job_id)
            check_transition(job_id, JobState(row["state"]), state, Kind(row["kind"]))
            if release:
                self._release(job_id)
            self.db.execute(
                "UPDATE jobs SET state = ?, updated = ?, message = COALESCE(?, message),"
                " exit_code = COALESCE(?, exit_code) WHERE id = ?",
                (state.value, now, reason, exit_code, job_id),
            )
            self._event(job_id, state, row["host"], reason, now)

    def note(self, job_id: str, reason: str, *, release: bool = False) -> None:
        """Record an event that changes no state (e.g. a guest found still running at recovery,
        NICs plugged back), and optionally free what the job still holds — atomically. Notes
        show in the job's timeline; they never count as a (re)start."""
        now = time.time()
        with self.reserving():
            row = self._current(job_id)
            if release:
                self._release(job_id)
            self.db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (now, job_id))
            self._event(job_id, JobState(row["state"]), row["host"], reason, now, note=True)

    def release(self, job_id: str) -> None:
        """Free what an ended job still holds (its guest has now gone), without a new state."""
        with self.reserving():
            self._release(job_id)

    def _release(self, job_id: str) -> None:
        # its own loans end with it; cpus it lent pass to their borrowers, which run there now
        # (the owner left them: it ended, moved or was re-pinned); a change row per borrower
        # so that the live model reads its (now larger) holding
        self.db.execute("DELETE FROM loans WHERE borrower = ?", (job_id,))
        inherited = list(self.db.execute("SELECT host, cpu, borrower FROM loans WHERE owner = ?",
                                         (job_id,)))
        if inherited:
            self.db.execute("DELETE FROM loans WHERE owner = ?", (job_id,))
            self.db.execute("DELETE FROM cpu_reservations WHERE job_id = ?", (job_id,))
            self.db.executemany(
                "INSERT INTO cpu_reservations (host, cpu, job_id) VALUES (?, ?, ?)",
                [(r["host"], r["cpu"], r["borrower"]) for r in inherited])
            self.db.executemany("INSERT INTO changes (job_id) VALUES (?)",
                                [(b,) for b in sorted({r["borrower"] for r in inherited})])
            # a note per borrower: its events now say it holds those cpus (usage accounting
            # counts them from here on, for it instead of the owner)
            now = time.time()
            for borrower in sorted({r["borrower"] for r in inherited}):
                cpus = ", ".join(str(r["cpu"]) for r in inherited if r["borrower"] == borrower)
                current = self._current(borrower)
                self._event(borrower, JobState(current["state"]), current["host"],
                            f"cpu {cpus} of job {job_id} is its own now: job {job_id} "
                            "left it", now, note=True)
        # memory: its borrowed memory ends with it; memory it lent passes to its borrowers,
        # which then hold all of theirs (a change row each: the live model reads it again)
        self.db.execute("DELETE FROM memory_loans WHERE borrower = ?", (job_id,))
        owed = sorted({r["borrower"] for r in self.db.execute(
            "SELECT borrower FROM memory_loans WHERE owner = ?", (job_id,))})
        if owed:
            self.db.execute("DELETE FROM memory_loans WHERE owner = ?", (job_id,))
            self.db.executemany("INSERT INTO changes (job_id) VALUES (?)", [(b,) for b in owed])
        # a job inside a reservation gives its rows back to the reservation (no row of its own)
        self.db.execute("UPDATE cpu_reservations SET user_id = NULL WHERE user_id = ?",
                        (job_id,))
        self.db.execute("UPDATE device_reservations SET user_id = NULL WHERE user_id = ?",
                        (job_id,))
        self.db.execute("DELETE FROM cpu_reservations WHERE job_id = ?", (job_id,))
        self.db.execute("DELETE FROM device_reservations WHERE job_id = ?", (job_id,))
        self.db.execute("UPDATE jobs SET allocation = NULL WHERE id = ?", (job_id,))

    def move_reservation(self, job_id: str, placeholder: str, allocation: Allocation) -> None:
        """A migrated job takes over the reservation its placeholder held on the destination
        and frees its old one; the placeholder is forgotten. One transaction."""
        with self.reserving():
            for job in (job_id, placeholder):
                self._release(job)
            self.db.execute("DELETE FROM events WHERE job_id = ?", (placeholder,))
            self.db.execute("DELETE FROM jobs WHERE id = ?", (placeholder,))
            self.db.execute("UPDATE jobs SET host = ?, allocation = ?, updated = ? WHERE id = ?",
                            (allocation.host, json.dumps(allocation_to_dict(allocation)),
                             time.time(), job_id))
            self._insert_reservation(job_id, allocation)

    def repin_reservation(self, job_id: str, allocation: Allocation, reason: str,
                          request: Request | None = None) -> None:
        """A job re-pinned (or resized) on its own host: its reservation becomes `allocation`
        (which may share cpus with the old one), with an event saying why, and its request
        `request` when given (a resized job is placed at its new size by later moves). One
        transaction: a cpu held by another job raises (UNIQUE key) and leaves the old
        reservation in place."""
        with self.reserving():
            row = self.db.execute("SELECT host, state FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
            if row is None or row["host"] != allocation.host:
                raise VmjobsError(f"job {job_id} does not run on {allocation.host}")
            # memory it lends stays lent if it keeps that much on the same node (its memory
            # is where it was); otherwise its borrowers hold their memory themselves (_release)
            lends = [r for r in self.memory_loans(job_id) if r.owner == job_id]
            self._release(job_id)
            self.db.execute("UPDATE jobs SET allocation = ?, updated = ? WHERE id = ?",
                            (json.dumps(allocation_to_dict(allocation)), time.time(), job_id))
            if request is not None:
                self.db.execute("UPDATE jobs SET request = ? WHERE id = ?",
                                (json.dumps(request_to_dict(request)), job_id))
            self._insert_reservation(job_id, allocation)
            kept = tuple(r for r in lends if [n.node for n in allocation.nodes] == [r.node]
                         and sum(k.mib for k in lends) <= allocation.memory_mib)
            if kept:
                self.lend_memory(kept)
            # a note: the job's state does not change
            self._event(job_id, JobState(row["state"]), allocation.host, reason, time.time(),
                        note=True)

    def delete_job(self, job_id: str) -> None:
        """Forget a job entirely: only for jobs refused before anything of them existed."""
        with self.reserving():
            self._release(job_id)
            self.db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def mark(self, job_id: str, **fields: object) -> None:
        """Add or replace fields of a job's spec (None removes one): how it is to be handled
        from now on, e.g. restored automatically after a preemption."""
        with self.reserving():
            row = self.db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise VmjobsError(f"unknown job {job_id!r}")
            spec = json.loads(row["spec"])
            for key, value in fields.items():
                if value is None:
                    spec.pop(key, None)
                else:
                    spec[key] = value
            self.db.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(spec), job_id))

    # --- cordoned hosts ---------------------------------------------------------------------

    def cordon(self, host: str, reason: str) -> None:
        with self.reserving():
            self.db.execute("INSERT OR REPLACE INTO cordons (host, reason, time) VALUES (?, ?, ?)",
                            (host, reason, time.time()))

    def uncordon(self, host: str) -> bool:
        with self.reserving():
            return self.db.execute("DELETE FROM cordons WHERE host = ?", (host,)).rowcount > 0

    def cordoned(self) -> dict[str, str]:
        rows = self.db.execute("SELECT host, reason FROM cordons ORDER BY host")
        return {r["host"]: r["reason"] or "" for r in rows}

    def ran_on(self, job_id: str) -> list[str]:
        """The host of each RUNNING event, in order: where the job's guest has run."""
        rows = self.db.execute(
            "SELECT host FROM events WHERE job_id = ? AND state = ? AND host IS NOT NULL "
            "AND note = 0 ORDER BY id", (job_id, JobState.RUNNING.value))
        return [r["host"] for r in rows]

    def usage_histories(self, since: float) -> list[JobHistory]:
        """The events of every job that had one at or after `since` (Unix s) or holds cores
        now, for `vmjobs.usage`. Bounded by `since` through the `events_time` index (a job
        held since before `since` is found through its reservation rows)."""
        rows = self.db.execute(
            "SELECT e.job_id, j.owner, j.created, e.time, e.state, e.note, e.held,"
            " json_extract(j.spec, '$.profile') AS profile"
            " FROM events e JOIN jobs j ON j.id = e.job_id"
            " WHERE e.job_id IN (SELECT job_id FROM events WHERE time >= ?"
            "                    UNION SELECT job_id FROM cpu_reservations)"
            " ORDER BY e.job_id, e.id", (since,))
        histories = []
        decoded: dict[str, Holding] = {}  # a job's events mostly repeat one allocation

        def holding(text: str | None) -> Holding | None:
            if not text:
                return None
            if text not in decoded:
                decoded[text] = Holding.from_allocation(json.loads(text))
            return decoded[text]

        for job_id, group in itertools.groupby(rows, key=lambda r: r["job_id"]):
            events = list(group)
            marks = tuple(Mark(r["time"], JobState(r["state"]), holding(r["held"]),
                               bool(r["note"])) for r in events)
            profile = events[0]["profile"]
            histories.append(JobHistory(job_id, events[0]["owner"], events[0]["created"], marks,
                                        profile if isinstance(profile, str) else None))
        return histories

    def job(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def ids_with_prefix(self, prefix: str, uid: int | None = None, limit: int = 6) -> list[str]:
        """Up to `limit` job ids starting with `prefix` (of `uid`'s jobs, or everyone's), in
        order. One range scan of the primary key (`id >= prefix AND id < prefix'`, where
        prefix' is the prefix with its last character incremented): LIKE would not use the
        index, since SQLite's LIKE is case-insensitive and the key is BINARY."""
        if not prefix:
            return []
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        if uid is None:
            rows = self.db.execute("SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id "
                                   "LIMIT ?", (prefix, upper, limit))
        else:
            rows = self.db.execute("SELECT id FROM jobs WHERE id >= ? AND id < ? AND uid = ? "
                                   "ORDER BY id LIMIT ?", (prefix, upper, uid, limit))
        return [r["id"] for r in rows]

    def jobs(self, uid: int | None = None) -> list[JobRecord]:
        if uid is None:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created")
        else:
            rows = self.db.execute("SELECT * FROM jobs WHERE uid = ? ORDER BY created", (uid,))
        return [_record(r) for r in rows]

    def array_members(self, array_id: str) -> list[JobRecord]:
        """The jobs of array `array_id` (`ARRAY_INDEX`), by index. A range on the primary key
        (ids have no `_` but the member's), so it reads the answer, not the table."""
        rows = self.db.execute("SELECT * FROM jobs WHERE id > ? AND id < ?",
                               (f"{array_id}_", f"{array_id}`"))  # "`" follows "_" in ASCII
        records = [_record(r) for r in rows]
        return sorted((r for r in records if r.id.rpartition("_")[0] == array_id
                       and r.id.rpartition("_")[2].isdigit()),
                      key=lambda r: int(r.id.rpartition("_")[2]))

    def id_range(self, low: str, high: str) -> list[JobRecord]:
        """The jobs whose id is strictly between `low` and `high` (a range on the primary key,
        O(answer)): e.g. a gang's members, `GANG.` .. `GANG/` (`vmjobs.gang`)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE id > ? AND id < ?", (low, high))
        return [_record(r) for r in rows]

    def events(self, job_id: str) -> list[Event]:
        rows = self.db.execute(
            "SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [Event(r["job_id"], r["time"], JobState(r["state"]), r["host"], r["reason"],
                      bool(r["note"])) for r in rows]

    # --- the daemon's queue ---------------------------------------------------------------------

    def submit(self, job: JobRecord, request: Request, reason: str,
               key_hash: str | None = None) -> None:
        """Insert a QUEUED job or reservation (nothing held yet) with its first event,
        atomically."""
        with self.reserving():
            self.add_job(job, request, None, reason, key_hash)

    def assign(self, job_id: str, allocation: Allocation, reason: str,
               loans: tuple[Loan, ...] = ()) -> None:
        """Give a queued (or checkpointed) job its reservation and make it PLACED. Call inside
        `reserving()`. Raises `IllegalTransition` from any other state. `loans`: cpus of
        `allocation` it borrows (recorded as loans, not reservations); sqlite3.IntegrityError
        when one is lent already or no longer held by its owner."""
        current = self._current(job_id)
        check_transition(job_id, JobState(current["state"]), JobState.PLACED)
        now = time.time()
        self.db.execute(
            "UPDATE jobs SET state = ?, host = ?, allocation = ?, updated = ? WHERE id = ?",
            (JobState.PLACED.value, allocation.host, json.dumps(allocation_to_dict(allocation)),
             now, job_id),
        )
        if current["inside"] is None:
            self._insert_reservation(job_id, allocation, loans)
        else:
            self._use_inside(current["inside"], job_id, allocation)
        self._event(job_id, JobState.PLACED, allocation.host, reason, now)

    def _use_inside(self, reservation_id: str, job_id: str, alloc: Allocation) -> None:
        """Mark the reservation's rows of `alloc` as used by `job_id`. Every cpu (and idle
        sibling) and NIC must be a row of the reservation that nobody inside uses: otherwise
        raises VmjobsError, and the caller's transaction rolls back. The (host, cpu) key stays
        the reservation's, so nothing outside it can take them meanwhile."""
        cpus = (*alloc.cpus, *alloc.idle_cpus)
        for table, column, values in (("cpu_reservations", "cpu", cpus),
                                      ("device_reservations", "address", alloc.devices)):
            for value in values:
                done = self.db.execute(
                    f"UPDATE {table} SET user_id = ? WHERE host = ? AND {column} = ?"
                    " AND job_id = ? AND user_id IS NULL",
                    (job_id, alloc.host, value, reservation_id)).rowcount
                if done != 1:
                    raise VmjobsError(f"job {job_id}: {column} {value} on {alloc.host} is not "
                                      f"free inside reservation {reservation_id}")

    def hold(self, reservation_id: str, allocation: Allocation, reason: str,
             until: float | None) -> None:
        """A queued reservation holds `allocation` from now on (HELD, rows of its own), until
        `until` (Unix s; None: until released). Call inside `reserving()`."""
        current = self._current(reservation_id)
        check_transition(reservation_id, JobState(current["state"]), JobState.HELD,
                         Kind(current["kind"]))
        now = time.time()
        self.db.execute(
            "UPDATE jobs SET state = ?, host = ?, allocation = ?, updated = ? WHERE id = ?",
            (JobState.HELD.value, allocation.host, json.dumps(allocation_to_dict(allocation)),
             now, reservation_id))
        self._insert_reservation(reservation_id, allocation)
        if until is not None:
            self.mark(reservation_id, until=until)
        self._event(reservation_id, JobState.HELD, allocation.host, reason, now)

    def key_hash(self, reservation_id: str) -> str | None:
        """The reservation's hashed key (None: it has none)."""
        row = self.db.execute("SELECT key_hash FROM jobs WHERE id = ?",
                              (reservation_id,)).fetchone()
        return row["key_hash"] if row else None

    def inside(self, reservation_id: str, states: frozenset[JobState] | None = None
               ) -> list[JobRecord]:
        """The jobs run inside a reservation (in `states` only, when given), oldest first."""
        rows = self.db.execute("SELECT * FROM jobs WHERE inside = ? ORDER BY created, rowid",
                               (reservation_id,))
        records = [_record(r) for r in rows]
        return [r for r in records if states is None or r.state in states]

    def used_inside(self, reservation_id: str) -> int:
        """How many of the reservation's rows a job inside it uses now."""
        return int(self.db.execute(
            "SELECT (SELECT COUNT(*) FROM cpu_reservations WHERE job_id = ?1 AND user_id IS NOT"
            " NULL) + (SELECT COUNT(*) FROM device_reservations WHERE job_id = ?1 AND user_id IS"
            " NOT NULL)", (reservation_id,)).fetchone()[0])

    def queued(self) -> list[tuple[JobRecord, Request]]:
        """Queued jobs in submission order (the caller applies priorities)."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state = ? ORDER BY created, rowid", (JobState.QUEUED.value,)
        )
        return [(_record(r), request_from_dict(json.loads(r["request"]))) for r in rows]

    def in_states(self, states: frozenset[JobState], uid: int | None = None) -> list[JobRecord]:
        """Jobs in `states` (of `uid` only, when given), oldest first; through the `jobs_state`
        or `jobs_uid` index, O(answer)."""
        marks = ", ".join("?" for _ in states)
        values: list[object] = [s.value for s in states]
        where = f"state IN ({marks})"
        if uid is not None:
            where = f"uid = ? AND {where}"
            values.insert(0, uid)
        rows = self.db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY created, rowid",
                               values)
        return [_record(r) for r in rows]

    def jobs_concerning(self, host: str, job_ids: list[str]) -> list[JobRecord]:
        """The unfinished jobs on `host` and the jobs `job_ids` (e.g. those whose guests were
        found there), oldest first: what recovery of one host needs, O(answer)."""
        marks = ", ".join("?" for _ in UNFINISHED)
        rows = {r["id"]: r for r in self.db.execute(
            f"SELECT * FROM jobs WHERE host = ? AND state IN ({marks})",
            (host, *(s.value for s in UNFINISHED)))}
        for job_id in job_ids:
            if job_id not in rows:
                row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None:
                    rows[job_id] = row
        return [_record(r) for r in sorted(rows.values(), key=lambda r: (r["created"], r["id"]))]

    def time_limits(self, states: frozenset[JobState]) -> list[tuple[str, object]]:
        """(job id, the time limit its spec holds) for the jobs in `states`: what the
        scheduler's backfill needs of every holder, read in SQL without parsing any JSON in
        Python (at 50,000 jobs that took ~5 s here). The spec's `time_limit`, or for records
        written before it, `timeout_s`; unchecked (the caller validates it)."""
        marks = ", ".join("?" for _ in states)
        # SQLite's JSON refuses what Python's json writes for NaN and Infinity (a record made
        # before submissions were checked): those few specs are parsed here instead
        rows = self.db.execute(
            "SELECT id, CASE WHEN NOT json_valid(spec) THEN NULL"
            " WHEN json_type(spec, '$.time_limit') IS NOT NULL"
            " THEN json_extract(spec, '$.time_limit') ELSE json_extract(spec, '$.timeout_s')"
            " END AS t, CASE WHEN json_valid(spec) THEN NULL ELSE spec END AS raw"
            f" FROM jobs WHERE state IN ({marks})", [s.value for s in states])
        found: list[tuple[str, object]] = []
        for r in rows:
            if r["raw"] is None:
                found.append((r["id"], r["t"]))
            else:
                spec = json.loads(r["raw"])
                found.append((r["id"], spec.get("time_limit", spec.get("timeout_s"))))
        return found

    def count_by_state(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def count_in(self, states: frozenset[JobState]) -> int:
        marks = ", ".join("?" for _ in states)
        return int(self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})",
                                   [s.value for s in states]).fetchone()[0])

    def started_at(self, job_ids: list[str] | None = None) -> dict[str, float]:
        """When each job that ever ran first became RUNNING (from its events); only those of
        `job_ids` when given (O(their events) through the `events_job` index, not O(events))."""
        if job_ids is None:
            rows = list(self.db.execute(
                "SELECT job_id, MIN(time) AS t FROM events WHERE state = ? AND note = 0 "
                "GROUP BY job_id",
                (JobState.RUNNING.value,),
            ))
        else:
            rows = []
            for chunk in range(0, len(job_ids), 500):  # SQLite's limit on bound values
                ids = job_ids[chunk:chunk + 500]
                marks = ", ".join("?" for _ in ids)
                rows += self.db.execute(
                    f"SELECT job_id, MIN(time) AS t FROM events WHERE job_id IN ({marks}) "
                    "AND state = ? AND note = 0 GROUP BY job_id",
                    (*ids, JobState.RUNNING.value),
                )
        return {r["job_id"]: r["t"] for r in rows}

    def reservations(self) -> dict[str, int]:
        """Rows held per job (cpus and devices): what must be empty when nothing runs."""
        rows = self.db.execute(
            "SELECT job_id, COUNT(*) AS n FROM (SELECT job_id FROM cpu_reservations"
            " UNION ALL SELECT job_id FROM device_reservations) GROUP BY job_id"
        )
        return {r["job_id"]: int(r["n"]) for r in rows}

    def reserved_cpus(self, host: str) -> dict[int, str]:
        rows = self.db.execute("SELECT cpu, job_id FROM cpu_reservations WHERE host = ?", (host,))
        return {r["cpu"]: r["job_id"] for r in rows}

    def reservation_count(self) -> int:
        cpus = self.db.execute("SELECT COUNT(*) FROM cpu_reservations").fetchone()[0]
        devices = self.db.execute("SELECT COUNT(*) FROM device_reservations").fetchone()[0]
        return int(cpus) + int(devices)

    # --- gangs' control state (vmjobs/controljournal.py) -------------------------------------

    def gang_control(self, gang_id: str) -> dict[tuple[str, str], str]:
        """The gang's rows (kind, name) -> value, in the order they were (re)written."""
        rows = self.db.execute("SELECT kind, name, value FROM gang_control WHERE gang_id = ?"
                               " ORDER BY rowid", (gang_id,))
        return {(r["kind"], r["name"]): r["value"] for r in rows}

    def write_gang_control(self, gang_id: str, upserts: dict[tuple[str, str], str],
                           deletes: Collection[tuple[str, str]]) -> None:
        """Change the gang's rows in one transaction (a rewritten row moves to the end of
        the order). Raises VmjobsError if the store refuses (e.g. a full disk)."""
        try:
            with self.reserving():
                self.db.executemany("DELETE FROM gang_control WHERE gang_id = ? AND kind = ?"
                                    " AND name = ?", [(gang_id, k, n) for k, n in deletes])
                self.db.executemany("INSERT OR REPLACE INTO gang_control (gang_id, kind, name,"
                                    " value) VALUES (?, ?, ?, ?)",
                                    [(gang_id, k, n, v) for (k, n), v in upserts.items()])
        except sqlite3.Error as exc:
            raise VmjobsError(f"gang {gang_id}: control state not written: {exc}") from None

    def forget_gang_control(self, gang_id: str) -> None:
        with self.reserving():
            self.db.execute("DELETE FROM gang_control WHERE gang_id = ?", (gang_id,))

    def gang_control_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT gang_id FROM gang_control")}


def _held(row: sqlite3.Row, lent: Collection[int] = (), borrowed_mib: int = 0) -> Held:
    alloc = without_cpus(allocation_from_dict(json.loads(row["allocation"])), lent)
    return Held(row["id"], without_memory(alloc, borrowed_mib) if borrowed_mib else alloc,
                request_from_dict(json.loads(row["request"])))


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], owner=row["owner"], uid=row["uid"], state=JobState(row["state"]),
        spec=json.loads(row["spec"]), host=row["host"], exit_code=row["exit_code"],
        message=row["message"], created=row["created"], updated=row["updated"],
        allocation=json.loads(row["allocation"]) if row["allocation"] else None,
        request=json.loads(row["request"]) if row["request"] else None,
        kind=Kind(row["kind"]), inside=row["inside"],
    )
