"""The state store (vmjobs.store): jobs, reservations, events, and no double booking ever."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from placement import Allocation, NodeShare, NumaPolicy, Request, ThreadPolicy
from vmjobs.codec import allocation_from_dict
from vmjobs.errors import VmjobsError
from vmjobs.jobs import FINISHED, INITIAL, TRANSITIONS, IllegalTransition, JobRecord, JobState
from vmjobs.store import Held, Store

HOST = "h1"


def alloc(*cpus: int, host: str = HOST, devices: tuple[str, ...] = (),
          idle: tuple[int, ...] = (), memory_mib: int = 512) -> Allocation:
    return Allocation(host=host, cpus=cpus, memory_mib=memory_mib,
                      nodes=(NodeShare(node=0, cpus=cpus, memory_mib=memory_mib),),
                      devices=devices, idle_cpus=idle)


def job(job_id: str, state: JobState = JobState.PLACED, uid: int = 1000) -> JobRecord:
    return JobRecord(id=job_id, owner="alice", uid=uid, state=state,
                     spec={"argv": ["sh", "-c", "echo hi"], "env": {"K": "V"}})


REQUEST = Request(cpus=1, memory_mib=512)


def _in_state(store: Store, job_id: str, state: JobState) -> None:
    """Put a job in `state` directly, past the state machine (test setup only); a job not yet
    in the store is created first, without a reservation."""
    if store.job(job_id) is None:
        store.add_job(job(job_id), REQUEST, None, "placed")
    store.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state.value, job_id))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "spool" / "state.db")
    yield s
    s.close()


def tables(s: Store) -> set[str]:
    return {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_schema_created_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "state.db"  # missing directories are made
    s = Store(path)
    assert path.exists()
    assert {"jobs", "cpu_reservations", "device_reservations", "events"} <= tables(s)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    s.close()


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = Store(path)
    first.add_job(job("a"), REQUEST, alloc(3), "placed")
    first.close()
    again = Store(path)  # creating the schema again is harmless
    assert [j.id for j in again.jobs()] == ["a"]
    assert again.reserved_cpus(HOST) == {3: "a"}
    again.close()


def test_unusable_location_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(VmjobsError, match="^cannot open the state store .*state.db: "):
        Store(blocker / "spool" / "state.db")  # its parent cannot be a directory
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(VmjobsError, match="^cannot open the state store"):
        Store(tmp_path / "dir.db")


def test_add_job_and_held_round_trip(store: Store) -> None:
    request = Request(cpus=2, memory_mib=2048, nics=1, nic_vendor="0x8086", nic_product="0x1572",
                      numa=NumaPolicy.STRICT, threads=ThreadPolicy.ISOLATE, hugepage_kib=2048,
                      host=HOST, pool="ci", labels=(("gen", "3"), ("rack", "r1")),
                      anti_affinity="grp", priority=5, preemptible=True)
    allocation = Allocation(
        host=HOST, cpus=(2, 3), memory_mib=2048,
        nodes=(NodeShare(node=0, cpus=(2, 3), memory_mib=2048),),
        devices=("0000:3b:00.0",), hugepage_kib=2048, idle_cpus=(18, 19),
    )
    with store.reserving():
        store.add_job(job("a"), request, allocation, "placed")
    assert store.held() == [Held("a", allocation, request)]
    # cpus, their idle siblings and the device are all rows under the UNIQUE keys
    assert store.reserved_cpus(HOST) == {2: "a", 3: "a", 18: "a", 19: "a"}
    assert store.reservation_count() == 5
    record = store.job("a")
    assert record is not None
    assert (record.state, record.host, record.owner, record.uid) == (
        JobState.PLACED, HOST, "alice", 1000)
    assert record.spec == job("a").spec
    assert record.allocation is not None
    assert allocation_from_dict(record.allocation) == allocation
    assert record.created > 0 and record.updated == record.created


def test_queued_job_holds_nothing(store: Store) -> None:
    store.add_job(job("q", JobState.QUEUED), REQUEST, None, "submitted")
    assert store.held() == []
    assert store.reservation_count() == 0
    record = store.job("q")
    assert record is not None and record.host is None and record.allocation is None
    (event,) = store.events("q")
    assert (event.state, event.host, event.reason) == (JobState.QUEUED, None, "submitted")


def test_jobs_listing(store: Store) -> None:
    store.add_job(job("a", uid=1000), REQUEST, alloc(0), "placed")
    store.add_job(job("b", uid=1001), REQUEST, alloc(1), "placed")
    store.add_job(job("c", uid=1000), REQUEST, None, "queued")
    assert [j.id for j in store.jobs()] == ["a", "b", "c"]
    assert [j.id for j in store.jobs(uid=1000)] == ["a", "c"]
    assert store.job("nope") is None


def test_ids_with_prefix_one_range_scan_of_the_primary_key(store: Store) -> None:
    for job_id, uid in (("3f9a1c2e", 1000), ("3f01aa00", 1000), ("3f77bb00", 1001),
                        ("40000000", 1000), ("3e999999", 1000)):
        store.add_job(job(job_id, uid=uid), REQUEST, None, "queued")
    assert store.ids_with_prefix("3f") == ["3f01aa00", "3f77bb00", "3f9a1c2e"]
    assert store.ids_with_prefix("3f", uid=1000) == ["3f01aa00", "3f9a1c2e"]
    assert store.ids_with_prefix("3f", limit=2) == ["3f01aa00", "3f77bb00"]
    assert store.ids_with_prefix("3f9") == ["3f9a1c2e"]
    assert store.ids_with_prefix("3F") == []  # ids are case-sensitive, as the key is
    assert store.ids_with_prefix("3f9a1c2e") == ["3f9a1c2e"]
    assert store.ids_with_prefix("3f9a1c2e0") == []
    assert store.ids_with_prefix("") == []
    # the store's own query walks the primary key's index, never the whole table
    for uid in (None, 1000):
        sent: list[str] = []
        store.db.set_trace_callback(sent.append)
        store.ids_with_prefix("3f", uid=uid)
        store.db.set_trace_callback(None)
        plan = " ".join(r[3] for r in store.db.execute("EXPLAIN QUERY PLAN " + sent[-1]))
        if uid is None:
            assert "INDEX sqlite_autoindex_jobs_1 (id>? AND id<?)" in plan, plan
        else:  # the primary key's range or the owner's index: an index either way
            assert "USING INDEX" in plan and "SCAN jobs" not in plan, plan


def test_transition_with_release_frees_the_reservation(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0, 1, devices=("0000:3b:00.0",), idle=(16,)), "p")
    store.add_job(job("b"), REQUEST, alloc(2), "placed")
    store.transition("a", JobState.STARTING, "starting")
    store.transition("a", JobState.RUNNING, "guest started")
    assert store.reserved_cpus(HOST) == {0: "a", 1: "a", 16: "a", 2: "b"}  # not released

    store.transition("a", JobState.COMPLETED, "exit 3", release=True, exit_code=3)
    assert store.reserved_cpus(HOST) == {2: "b"}
    assert store.reservation_count() == 1
    assert [h.job_id for h in store.held()] == ["b"]
    record = store.job("a")
    assert record is not None
    assert (record.state, record.exit_code, record.message, record.allocation) == (
        JobState.COMPLETED, 3, "exit 3", None)
    # what was freed can be reserved again, device included
    store.add_job(job("c"), REQUEST, alloc(0, 16, devices=("0000:3b:00.0",)), "placed")
    assert store.reserved_cpus(HOST) == {0: "c", 16: "c", 2: "b"}


def test_transition_keeps_the_message_and_exit_code_unless_given(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0), "placed")
    store.transition("a", JobState.STARTING, "guest crashed", exit_code=1)
    store.transition("a", JobState.LOST, None)
    record = store.job("a")
    assert record is not None
    assert (record.state, record.message, record.exit_code) == (JobState.LOST, "guest crashed", 1)
    assert record.updated >= record.created


def test_transition_of_an_unknown_job(store: Store) -> None:
    with pytest.raises(VmjobsError, match="unknown job 'ghost'"):
        store.transition("ghost", JobState.RUNNING, "x")
    assert store.events("ghost") == []
    assert not store.db.in_transaction


def test_events_in_order(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0), "placed")
    for state, reason in ((JobState.STARTING, "starting (qemu)"),
                          (JobState.RUNNING, "guest started"),
                          (JobState.COMPLETED, "exit 0")):
        store.transition("a", state, reason, release=state == JobState.COMPLETED)
    events = store.events("a")
    assert [(e.state, e.reason) for e in events] == [
        (JobState.PLACED, "placed"), (JobState.STARTING, "starting (qemu)"),
        (JobState.RUNNING, "guest started"), (JobState.COMPLETED, "exit 0")]
    assert all(e.host == HOST and e.job_id == "a" for e in events)
    times = [e.time for e in events]
    assert times == sorted(times)


def test_delete_job_leaves_nothing(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0, devices=("0000:3b:00.0",)), "placed")
    store.add_job(job("b"), REQUEST, alloc(1), "placed")
    store.transition("a", JobState.STARTING, "starting")
    store.delete_job("a")
    assert store.job("a") is None
    assert store.events("a") == []
    assert store.reserved_cpus(HOST) == {1: "b"}
    assert store.reservation_count() == 1
    assert [j.id for j in store.jobs()] == ["b"]


# --- no double booking -----------------------------------------------------------------------


def snapshot(s: Store) -> tuple:
    return (
        [(j.id, j.state, j.allocation) for j in s.jobs()],
        sorted(s.reserved_cpus(HOST).items()),
        s.reservation_count(),
        s.db.execute("SELECT COUNT(*) FROM events").fetchone()[0],
    )


@pytest.mark.parametrize("inside_reserving", [True, False])
@pytest.mark.parametrize(
    "taken",
    [
        alloc(1, 2),  # shares cpu 1
        alloc(5, idle=(0,)),  # its idle sibling is a's cpu
        alloc(4, devices=("0000:3b:00.0",)),  # shares the NIC
    ],
    ids=["cpu", "idle-sibling", "device"],
)
def test_reusing_a_held_cpu_or_device_fails_and_leaves_nothing(
        store: Store, taken: Allocation, inside_reserving: bool) -> None:
    store.add_job(job("a"), REQUEST, alloc(0, 1, devices=("0000:3b:00.0",)), "placed")
    before = snapshot(store)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        if inside_reserving:
            with store.reserving():
                store.add_job(job("b"), REQUEST, taken, "placed")
        else:
            store.add_job(job("b"), REQUEST, taken, "placed")
    assert not store.db.in_transaction
    assert snapshot(store) == before
    assert store.job("b") is None
    assert [h.job_id for h in store.held()] == ["a"]


def test_same_cpu_on_another_host_is_fine(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0, 1), "placed")
    store.add_job(job("b"), REQUEST, alloc(0, 1, host="h2"), "placed")
    assert store.reserved_cpus(HOST) == {0: "a", 1: "a"}
    assert store.reserved_cpus("h2") == {0: "b", 1: "b"}


def test_reserving_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.reserving():
        store.add_job(job("a"), REQUEST, alloc(0), "placed")
        raise RuntimeError("placement changed its mind")
    assert store.jobs() == []
    assert store.reservation_count() == 0
    assert not store.db.in_transaction


def test_reserving_excludes_other_writers(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first, second = Store(path), Store(path)
    second.db.execute("PRAGMA busy_timeout = 50")
    try:
        with first.reserving():
            with pytest.raises(sqlite3.OperationalError, match="locked"), second.reserving():
                pass
            # readers are not blocked and do not see the uncommitted reservation
            first.add_job(job("a"), REQUEST, alloc(0), "placed")
            assert second.reserved_cpus(HOST) == {}
        assert second.reserved_cpus(HOST) == {0: "a"}
        with second.reserving():  # free again once the first committed
            second.add_job(job("b"), REQUEST, alloc(1), "placed")
    finally:
        first.close()
        second.close()


WORKERS = 8
FRESH_STORES = 10


def _reserve_lowest_free_cpu(spool: str, job_id: str, barrier, results) -> None:
    """`vmjob run` in miniature, started by WORKERS processes at the same moment.

    First they all open the same brand-new store files, one after the other (the race of
    several first runs on a fresh spool); then each decides and reserves under the lock.
    """
    try:
        barrier.wait()  # everyone starts at the same moment
        for i in range(FRESH_STORES):
            Store(Path(spool) / f"fresh-{i}" / "state.db").close()
        store = Store(Path(spool) / "state.db")
        try:
            with store.reserving():
                held = {c for h in store.held() for c in h.allocation.cpus}
                free = min(set(range(WORKERS)) - held)
                time.sleep(0.02)  # a wide window between reading and writing
                store.add_job(job(job_id), REQUEST, alloc(free), "placed")
        finally:
            store.close()
        results.put((job_id, free))
    except BaseException as exc:
        results.put((job_id, repr(exc)))
        raise


def test_concurrent_processes_never_share_a_cpu(tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # not even created yet: they race for that too
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_reserve_lowest_free_cpu,
                         args=(str(spool), f"job{i}", barrier, results))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * WORKERS, got
    assert sorted(got.values()) == list(range(WORKERS)), got
    s = Store(spool / "state.db")
    try:
        assert {cpu: job_id for job_id, cpu in got.items()} == s.reserved_cpus(HOST)
        assert len(s.jobs()) == WORKERS
    finally:
        s.close()


# --- moves: cordons, spec marks, a migrated job's reservation ------------------------------


def test_cordons_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = Store(path)
    first.cordon("h1", "draining")
    first.cordon("h2", "maintenance")
    assert first.uncordon("h2") is True
    assert first.uncordon("h2") is False
    first.close()
    again = Store(path)
    assert again.cordoned() == {"h1": "draining"}
    again.close()


def test_mark_adds_and_removes_spec_fields(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(1), "placed")
    store.mark("a", restore="auto", time_left_s=12.5)
    record = store.job("a")
    assert record is not None and record.spec["restore"] == "auto"
    assert record.spec["argv"] == ["sh", "-c", "echo hi"]  # the rest is kept
    store.mark("a", restore=None)
    record = store.job("a")
    assert record is not None and "restore" not in record.spec
    assert record.spec["time_left_s"] == 12.5
    with pytest.raises(VmjobsError, match="unknown job"):
        store.mark("zz", restore="auto")


def test_move_reservation_hands_the_placeholders_room_to_the_job(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(1, devices=("d0",)), "placed")
    _in_state(store, "a", JobState.RUNNING)
    store.add_job(job("mig-a"), REQUEST, alloc(5, host="h2", devices=("d9",)), "placeholder")
    store.add_job(job("b"), REQUEST, alloc(2), "placed")
    store.move_reservation("a", "mig-a", alloc(5, host="h2", devices=("d9",)))
    assert store.job("mig-a") is None and store.events("mig-a") == []
    record = store.job("a")
    assert record is not None and record.host == "h2" and record.state == JobState.RUNNING
    assert record.allocation is not None
    assert allocation_from_dict(record.allocation) == alloc(5, host="h2", devices=("d9",))
    assert store.reserved_cpus("h1") == {2: "b"}
    assert store.reserved_cpus("h2") == {5: "a"}
    rows = store.db.execute("SELECT host, address, job_id FROM device_reservations").fetchall()
    assert [tuple(r) for r in rows] == [("h2", "d9", "a")]


def test_the_engines_view_keeps_cordoned_hosts_for_the_jobs_they_hold(store: Store) -> None:
    from dataclasses import replace as with_state

    from placement import HostState, make_host
    from vmjobs.snapshot import snapshot

    hosts = [make_host("h1", nodes=1, cores=4), make_host("h2", nodes=1, cores=4),
             with_state(make_host("h3", nodes=1, cores=4), state=HostState.DOWN)]
    store.add_job(job("a"), REQUEST, alloc(1, host="h1"), "placed")
    _in_state(store, "a", JobState.RUNNING)
    store.cordon("h1", "draining")
    store.cordon("h3", "maintenance")
    cluster = snapshot(store, hosts)
    assert cluster.hosts["h1"].state == HostState.CORDONED
    assert cluster.hosts["h3"].state == HostState.DOWN  # down stays down
    assert cluster.allocation_of("a").host == "h1"  # what it holds stays held
    decision = cluster.place(Request(cpus=1, memory_mib=128))
    assert decision.allocation is not None and decision.allocation.host == "h2"
    assert "cordoned" in cluster.explain(Request(cpus=1, memory_mib=128, host="h1")).summary


# --- the job state machine ---------------------------------------------------------------------



def test_the_table_covers_every_state_and_finished_states_are_final() -> None:
    assert set(TRANSITIONS) == set(JobState)
    assert all(not TRANSITIONS[s] for s in FINISHED)
    assert all(old not in TRANSITIONS[old] for old in JobState)  # a repeat is a note
    # every state but the initial ones can be reached, and every state can end; HELD and
    # RELEASED are reached by reservations only (their table: tests/unit/test_reservations.py)
    reached = set(INITIAL) | {new for news in TRANSITIONS.values() for new in news}
    assert reached == set(JobState) - {JobState.HELD, JobState.RELEASED}


@pytest.mark.parametrize("old", list(JobState))
def test_every_allowed_transition_is_accepted_and_every_other_refused(store: Store,
                                                                     old: JobState) -> None:
    for new in JobState:
        job_id = f"{old.value[:4]}-{new.value}".lower()
        _in_state(store, job_id, old)
        before = store.events(job_id)
        if new in TRANSITIONS[old]:
            store.transition(job_id, new, "ok")
            assert store.job(job_id).state == new  # type: ignore[union-attr]
            assert store.events(job_id)[-1].state == new
        else:
            with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value} is not"):
                store.transition(job_id, new, "refused", release=True)
            record = store.job(job_id)
            assert record is not None and record.state == old  # nothing written
            assert store.events(job_id) == before
            assert not store.db.in_transaction


@pytest.mark.parametrize("state", list(JobState))
def test_a_job_is_created_only_queued_or_placed(store: Store, state: JobState) -> None:
    record = job("n", state)
    if state in INITIAL:
        store.add_job(record, REQUEST, alloc(0) if state == JobState.PLACED else None, "new")
        assert store.job("n").state == state  # type: ignore[union-attr]
    else:
        with pytest.raises(IllegalTransition, match=r"\(new\) -> "):
            store.add_job(record, REQUEST, alloc(0), "new")
        assert store.job("n") is None and store.reservation_count() == 0


@pytest.mark.parametrize("state", list(JobState))
def test_assign_places_only_queued_or_checkpointed_jobs(store: Store, state: JobState) -> None:
    _in_state(store, "q", state)
    with store.reserving():
        if JobState.PLACED in TRANSITIONS[state]:
            store.assign("q", alloc(0), "placed")
        else:
            with pytest.raises(IllegalTransition):
                store.assign("q", alloc(0), "placed")
    assert store.reservation_count() == (1 if JobState.PLACED in TRANSITIONS[state] else 0)


def test_a_note_keeps_the_state_and_is_no_restart(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0), "placed")
    store.transition("a", JobState.STARTING, "starting")
    store.transition("a", JobState.RUNNING, "guest started")
    started = store.started_at()["a"]
    store.note("a", "found running at recovery")
    record = store.job("a")
    assert record is not None and record.state == JobState.RUNNING
    assert record.message == "guest started"  # a note is history, not the job's message
    last = store.events("a")[-1]
    assert (last.state, last.reason, last.note, last.host) == (
        JobState.RUNNING, "found running at recovery", True, HOST)
    assert store.ran_on("a") == [HOST]  # one stay: the note is not a new console segment
    assert store.started_at()["a"] == started
    with pytest.raises(IllegalTransition):
        store.transition("a", JobState.RUNNING, "repeat")  # a repeat must be a note


def test_a_note_can_free_what_an_ended_job_still_holds(store: Store) -> None:
    store.add_job(job("a"), REQUEST, alloc(0, 1), "placed")
    store.transition("a", JobState.FAILED, "could not start")
    store.note("a", "reservation freed at recovery", release=True)
    assert store.reservation_count() == 0
    assert store.job("a").state == JobState.FAILED  # type: ignore[union-attr]
    with pytest.raises(VmjobsError, match="unknown job 'ghost'"):
        store.note("ghost", "x")


def test_a_store_written_before_notes_is_upgraded_and_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, uid INTEGER NOT NULL,
            state TEXT NOT NULL, spec TEXT NOT NULL, request TEXT NOT NULL, host TEXT,
            allocation TEXT, exit_code INTEGER, message TEXT, created REAL NOT NULL,
            updated REAL NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
            time REAL NOT NULL, state TEXT NOT NULL, host TEXT, reason TEXT);
        INSERT INTO jobs VALUES ('old', 'alice', 1000, 'COMPLETED',
            '{"argv": ["true"], "timeout_s": 60}', '{"cpus": 1, "memory_mib": 256}', 'h1',
            NULL, 0, 'exit status 0', 1.0, 2.0);
        INSERT INTO events (job_id, time, state, host, reason)
            VALUES ('old', 1.0, 'RUNNING', 'h1', 'guest started');
    """)
    old.close()
    s = Store(path)
    record = s.job("old")
    assert record is not None and record.state == JobState.COMPLETED
    assert [(e.reason, e.note) for e in s.events("old")] == [("guest started", False)]
    assert s.ran_on("old") == ["h1"]
    s.close()
    Store(path).close()  # upgrading twice is harmless


def test_a_second_store_in_one_process_never_loses_the_first_ones_writes(tmp_path: Path) -> None:
    """Opening (and closing) another connection in the same process — the daemon's movers do —
    must not drop the first connection's locks: its later commits stay visible to everyone."""
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "state.db"
    first = Store(path, shared=True)
    first.add_job(JobRecord(id="a", owner="u", uid=1, state=JobState.QUEUED, spec={}),
                  Request(cpus=1, memory_mib=128), None, "submitted")
    second = Store(path, shared=True)
    second.note("a", "seen by the second connection")
    second.close()
    code = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
            "print(db.execute(\"SELECT state FROM jobs WHERE id = 'a'\").fetchone()[0]); "
            "db.close()")

    def state_seen_by_another_process() -> str:
        # a reader that closes last in its own view checkpoints and resets the WAL unless the
        # first connection's locks still tell it otherwise (`vmjob` clients do this all day)
        seen = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=60)
        return seen.stdout.strip() or seen.stderr

    assert state_seen_by_another_process() == "QUEUED"
    first.transition("a", JobState.CANCELLED, "cancelled through the first connection")
    assert state_seen_by_another_process() == "CANCELLED"
    first.close()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM events").fetchone()[0] == 3


def test_time_limits_read_as_the_spec_says_without_parsing_it(tmp_path: Path) -> None:
    """`time_limits` (the scheduler's holders) reads what `core.time_limit_of` reads: the
    spec's time_limit, else a record's older timeout_s; a null time_limit is no limit."""
    store = Store(tmp_path / "s.db")
    specs = {"a": {"time_limit": 60.5}, "b": {"timeout_s": 30}, "c": {"time_limit": None,
             "timeout_s": 30}, "d": {}, "e": {"time_limit": "soon"},
             "f": {"timeout_s": float("nan")}}  # an old record: JSON SQLite refuses
    for job_id, spec in specs.items():
        store.add_job(JobRecord(id=job_id, owner="alice", uid=1000, state=JobState.PLACED,
                                spec={"argv": ["true"], **spec}), REQUEST, None, "placed")
    limits = dict(store.time_limits(frozenset({JobState.PLACED})))
    assert math.isnan(limits.pop("f"))  # type: ignore[arg-type]
    assert limits == {"a": 60.5, "b": 30, "c": None, "d": None, "e": "soon"}


def test_reserving_inside_reserving_joins_one_transaction(store: Store) -> None:
    """Many transitions as one transaction (a cancel of many jobs): all or none."""
    for n in range(3):
        store.submit(JobRecord(id=f"b{n}", owner="u", uid=1, state=JobState.QUEUED,
                               spec={"argv": ["true"]}), Request(cpus=1, memory_mib=256), "in")
    with pytest.raises(IllegalTransition), store.reserving():
        store.transition("b0", JobState.CANCELLED, "c")  # its own reserving() joins
        store.transition("b1", JobState.CANCELLED, "c")
        store.transition("b1", JobState.CANCELLED, "c")  # a bug: rolls back all three
    assert [store.job(f"b{n}").state for n in range(3)] == [JobState.QUEUED] * 3  # type: ignore[union-attr]
    with store.reserving():
        for n in range(3):
            store.transition(f"b{n}", JobState.CANCELLED, "c")
    assert not store.db.in_transaction
    assert [store.job(f"b{n}").state for n in range(3)] == [JobState.CANCELLED] * 3  # type: ignore[union-attr]
    assert [e.state for e in store.events("b2")] == [JobState.QUEUED, JobState.CANCELLED]
