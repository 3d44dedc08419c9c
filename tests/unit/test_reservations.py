"""Held reservations without a daemon: their state machine, the key check, the store's rows
for jobs inside a reservation, the reservation's share as a host of its own, and the spec a
reservation accepts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import placement
from placement import Allocation, Cpu, Device, Host, Node, NodeShare, Request
from vmjobs import holdkey, holdspec
from vmjobs.errors import VmjobsError
from vmjobs.jobs import (
    FINISHED,
    RESERVATION_TRANSITIONS,
    TRANSITIONS,
    IllegalTransition,
    JobRecord,
    JobState,
    Kind,
    allowed,
)
from vmjobs.spec import SpecError
from vmjobs.store import Store

HOST = "h1"
REQUEST = Request(cpus=2, memory_mib=1024)


def alloc(*cpus: int, memory_mib: int = 1024, devices: tuple[str, ...] = ()) -> Allocation:
    return Allocation(host=HOST, cpus=cpus, memory_mib=memory_mib,
                      nodes=(NodeShare(node=0, cpus=cpus, memory_mib=memory_mib),),
                      devices=devices)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def held_reservation(store: Store, rid: str = "r1", cpus: tuple[int, ...] = (0, 1),
                     devices: tuple[str, ...] = ()) -> None:
    store.submit(JobRecord(rid, "alice", 1000, JobState.QUEUED, {"tied": True},
                           kind=Kind.RESERVATION), REQUEST, "asked")
    with store.reserving():
        store.hold(rid, alloc(*cpus, devices=devices), "held", None)


def queued_inside(store: Store, job_id: str, rid: str = "r1") -> None:
    store.submit(JobRecord(job_id, "alice", 1000, JobState.QUEUED, {"argv": ["true"]},
                           inside=rid), Request(cpus=1, memory_mib=256), "submitted")


# --- the state machine ------------------------------------------------------------------------


def test_a_reservation_waits_then_holds_then_ends_and_never_runs_a_guest() -> None:
    r = Kind.RESERVATION
    assert allowed(None, JobState.QUEUED, r) and not allowed(None, JobState.PLACED, r)
    assert allowed(JobState.QUEUED, JobState.HELD, r)
    for end in (JobState.RELEASED, JobState.TIMEOUT, JobState.LOST):
        assert allowed(JobState.HELD, end, r)
    # a reservation is never placed to start a guest, never runs, never moves
    for state in (JobState.PLACED, JobState.STARTING, JobState.RUNNING, JobState.MIGRATING,
                  JobState.CHECKPOINTED):
        assert not allowed(JobState.QUEUED, state, r)
        assert not allowed(JobState.HELD, state, r)
    assert all(not RESERVATION_TRANSITIONS[s] for s in FINISHED)
    # and a job is never HELD or RELEASED
    assert all(JobState.HELD not in n and JobState.RELEASED not in n
               for n in TRANSITIONS.values())
    assert not allowed(JobState.QUEUED, JobState.HELD)


def test_the_store_keeps_each_kind_to_its_own_table(store: Store) -> None:
    held_reservation(store)
    record = store.job("r1")
    assert record is not None and record.kind == Kind.RESERVATION
    assert record.state == JobState.HELD
    with pytest.raises(IllegalTransition):
        store.transition("r1", JobState.RUNNING, "a reservation runs no guest")
    store.transition("r1", JobState.RELEASED, "released", release=True)
    assert store.reservation_count() == 0
    assert store.events("r1")[-1].state == JobState.RELEASED


# --- keys ---------------------------------------------------------------------------------


def test_only_the_right_key_opens_a_keyed_reservation() -> None:
    stored = holdkey.hash_key("s3cret")
    assert "s3cret" not in stored and stored.startswith("scrypt$")
    assert holdkey.key_matches("s3cret", stored)
    assert not holdkey.key_matches("s3cret ", stored)
    assert not holdkey.key_matches("", stored)
    assert not holdkey.key_matches(None, stored)  # a missing key, even the owner's
    assert holdkey.hash_key("s3cret") != stored  # salted
    # a reservation without a key: only no key
    assert holdkey.key_matches(None, None) and not holdkey.key_matches("x", None)
    assert not holdkey.key_matches("s3cret", "scrypt$garbage")  # damaged: opens nothing


def test_the_stored_hash_is_rfc_7914_scrypt_of_the_key() -> None:
    salt = bytes(range(16))
    _, n, r, p, salt_hex, digest = holdkey.hash_key("k", salt).split("$")
    assert bytes.fromhex(salt_hex) == salt
    assert bytes.fromhex(digest) == hashlib.scrypt(b"k", salt=salt, n=int(n), r=int(r),
                                                   p=int(p), dklen=32)


def test_refusals_name_the_reservation_and_never_a_key() -> None:
    stored = holdkey.hash_key("k1")
    assert "needs its key" in holdkey.refusal("r9", None, stored)
    assert holdkey.refusal("r9", "guess", stored) == "wrong key for reservation r9"
    assert "has no key" in holdkey.refusal("r9", "guess", None)
    with pytest.raises(VmjobsError):
        holdkey.check_key_text("a\nb")
    with pytest.raises(VmjobsError):
        holdkey.check_key_text("x" * (holdkey.MAX_KEY_CHARS + 1))


# --- jobs inside: the reservation's rows, used ------------------------------------------------


def test_a_job_inside_uses_the_reservations_rows_without_rows_of_its_own(store: Store) -> None:
    held_reservation(store, devices=("0000:00:10.0",))
    queued_inside(store, "j1")
    with store.reserving():
        store.assign("j1", alloc(1, memory_mib=256, devices=("0000:00:10.0",)), "inside")
    rows = {r["cpu"]: (r["job_id"], r["user_id"]) for r in store.db.execute(
        "SELECT cpu, job_id, user_id FROM cpu_reservations")}
    assert rows == {0: ("r1", None), 1: ("r1", "j1")}
    assert store.used_inside("r1") == 2  # the cpu and the NIC
    # the engine's view counts the reservation once: the job inside is not a holder
    assert [h.job_id for h in store.held()] == ["r1"]
    assert store.holding("j1") is None
    # a job inside holds nothing of its own in its events (usage counts the reservation)
    assert json.loads(store.db.execute("SELECT held FROM events WHERE job_id = 'r1' AND "
                                       "state = 'HELD'").fetchone()[0])["cpus"] == [0, 1]
    assert store.db.execute("SELECT held FROM events WHERE job_id = 'j1' AND state = "
                            "'PLACED'").fetchone()[0] is None
    # its end gives the rows back to the reservation, which still holds them
    store.transition("j1", JobState.FAILED, "done", release=True)
    assert store.used_inside("r1") == 0 and store.reservation_count() == 3


def test_a_cpu_used_inside_cannot_be_used_twice_nor_one_outside_the_reservation(
        store: Store) -> None:
    held_reservation(store)
    queued_inside(store, "j1")
    queued_inside(store, "j2")
    queued_inside(store, "j3")
    with store.reserving():
        store.assign("j1", alloc(0, memory_mib=256), "inside")
    with pytest.raises(VmjobsError, match="not free inside reservation r1"), \
            store.reserving():
        store.assign("j2", alloc(0, memory_mib=256), "the same cpu")
    with pytest.raises(VmjobsError, match="cpu 5 on h1 is not free inside"), \
            store.reserving():
        store.assign("j3", alloc(5, memory_mib=256), "outside it")
    # both refused whole: still queued, nothing used
    assert store.job("j2").state == JobState.QUEUED  # type: ignore[union-attr]
    assert store.job("j3").state == JobState.QUEUED  # type: ignore[union-attr]
    assert store.used_inside("r1") == 1


def test_an_old_store_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, uid INTEGER NOT NULL,
            state TEXT NOT NULL, spec TEXT NOT NULL, request TEXT NOT NULL, host TEXT,
            allocation TEXT, exit_code INTEGER, message TEXT, created REAL NOT NULL,
            updated REAL NOT NULL);
        CREATE TABLE cpu_reservations (host TEXT NOT NULL, cpu INTEGER NOT NULL,
            job_id TEXT NOT NULL, PRIMARY KEY (host, cpu));
        CREATE TABLE device_reservations (host TEXT NOT NULL, address TEXT NOT NULL,
            job_id TEXT NOT NULL, PRIMARY KEY (host, address));
        INSERT INTO jobs VALUES ('a1', 'alice', 1000, 'COMPLETED', '{}', '{}', NULL, NULL, 0,
            NULL, 1, 1);
    """)
    db.close()
    store = Store(path)
    old = store.job("a1")
    assert old is not None and old.kind == Kind.JOB and old.inside is None
    held_reservation(store)
    store.close()


# --- a reservation's share as a host ----------------------------------------------------------


def test_restrict_keeps_only_what_the_reservation_holds() -> None:
    cpus = tuple(Cpu(i, i // 2, 0, frozenset({i - i % 2, i - i % 2 + 1})) for i in range(8))
    host = Host(HOST, (Node(0, cpus[:4], 4096), Node(1, cpus[4:], 4096)),
                devices=(Device("0000:01:00.0", 0), Device("0000:02:00.0", 1)),
                reserved_cpus=frozenset({0}), labels=(("rack", "r1"),), pools=("lab",))
    allocation = Allocation(HOST, (1, 2), 1536, (NodeShare(0, (1, 2), 1536),),
                            devices=("0000:02:00.0",))
    share = placement.restrict(host, allocation)
    assert [c.id for n in share.nodes for c in n.cpus] == [1, 2]
    assert {c.id: c.siblings for c in share.nodes[0].cpus} == {1: {1}, 2: {2}}
    assert [(n.id, n.memory_mib) for n in share.nodes] == [(0, 1536), (1, 0)]
    assert [d.address for d in share.devices] == ["0000:02:00.0"]
    assert share.reserved_cpus == frozenset() and share.pools == ("lab",)
    inside = placement.Cluster([share])
    assert inside.ever_fits(Request(cpus=2, memory_mib=1536, nics=1, numa="any"))
    assert not inside.ever_fits(Request(cpus=3, memory_mib=256))
    assert not inside.ever_fits(Request(cpus=1, memory_mib=2048))
    # two side by side, and never on a cpu outside the reservation
    first = inside.place(Request(cpus=1, memory_mib=512)).allocation
    assert first is not None
    inside.reserve("a", first)
    second = inside.place(Request(cpus=1, memory_mib=512)).allocation
    assert second is not None and {*first.cpus, *second.cpus} == {1, 2}
    inside.reserve("b", second)
    assert not inside.place(Request(cpus=1, memory_mib=256)).fits
    with pytest.raises(ValueError):
        placement.restrict(host, Allocation("other", (1,), 256, (NodeShare(0, (1,), 256),)))


# --- what a reservation may ask for -------------------------------------------------------------


def test_a_reservation_spec_is_a_job_spec_without_what_only_a_guest_has() -> None:
    spec = holdspec.parse_hold({"cpus": 2, "mem": "1G", "nics": 1, "time_limit": 7200})
    assert (spec.cpus, spec.mem, spec.nics, spec.time_limit) == (2, 1024, 1, 7200)
    assert "argv" not in holdspec.to_body(spec)
    assert holdspec.parse_hold(holdspec.to_body(spec)) == spec
    for field, value in (("env", {"A": "1"}), ("input", "tok"), ("image", "other"),
                         ("array", "1-3"), ("preemptible", True)):
        with pytest.raises(SpecError, match="is for jobs"):
            holdspec.parse_hold({field: value})
    with pytest.raises(SpecError, match="runs no command"):
        holdspec.parse_hold({"argv": ["true"]})
