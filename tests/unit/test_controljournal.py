"""Gangs' control state in the store (vmjobs/controljournal.py, the hub's journal): written in
order, taken up by a new hub (a restarted daemon), dropped when the gang ends or, at recovery,
when it is no longer live; a graceful stop keeps it. A real SQLite store in a temporary
directory, no libvirt (members have no ports here: their replies are logged, not sent)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vmjobs.control import GangState, MemberInfo
from vmjobs.controlhub import ControlError, ControlHub
from vmjobs.controljournal import ControlJournal
from vmjobs.store import Store

MEMBERS = {0: MemberInfo("h1", "10.64.0.1"), 1: MemberInfo("h2", "10.64.0.2")}


def hub(path: Path) -> ControlHub:
    made = ControlHub(journal=ControlJournal(path))
    made.open_gang("g1", MEMBERS)
    return made


def rows(path: Path, gang_id: str = "g1") -> dict[tuple[str, str], str]:
    store = Store(path)
    try:
        return store.gang_control(gang_id)
    finally:
        store.close()


def test_kv_set_returns_once_it_is_in_the_store(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = hub(db)
    first.kv_set("g1", "addr", "node0:5000")
    assert rows(db)[("kv", "addr")] == "node0:5000"  # no flush: kv_set waited for it
    first.request("g1", 1, b"a kv set token s3cret")
    first.request("g1", 0, b"b baton take t")
    first.member_failed("g1", 1, "exit status 1")
    assert first.journal is not None and first.journal.flush()
    # a new daemon (a new hub on the same store) takes the state up
    second = hub(db)
    assert second.kv_get("g1", "addr") == "node0:5000"
    assert second.kv_get("g1", "token") == "s3cret"
    control = second.gangs["g1"].control
    assert control.batons["t"].holder == 0
    assert control.state == GangState.POISONED
    assert control.poison_reason == "poisoned by node1 (h2): exit status 1"
    # an unchanged state writes nothing more
    assert second.gangs["g1"].saved == rows(db)


def test_an_ended_gang_leaves_no_rows_and_a_stop_keeps_them(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = hub(db)
    first.kv_set("g1", "k", "v")
    first.shutdown()  # a graceful stop: the gang runs on, its state stays
    assert rows(db) == {("kv", "k"): "v"}
    second = hub(db)
    second.close_gang("g1")
    assert second.journal is not None and second.journal.flush()
    assert rows(db) == {}
    with pytest.raises(ControlError, match="not a running gang"):
        second.kv_get("g1", "k")


def test_recovery_forgets_only_gangs_that_are_not_live(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = hub(db)
    first.open_gang("g2", MEMBERS)
    first.kv_set("g1", "k", "1")
    first.kv_set("g2", "k", "2")
    journal = first.journal
    assert journal is not None
    journal.forget_except({"g2"})
    assert journal.flush()
    assert rows(db, "g1") == {}
    assert rows(db, "g2") == {("kv", "k"): "2"}


def test_writes_keep_their_order_under_concurrent_setters(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = hub(db)

    def setter(n: int) -> None:
        for i in range(20):
            first.kv_set("g1", "k", f"{n}-{i}")

    threads = [threading.Thread(target=setter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # whatever the interleaving, the store ends with what memory ends with
    assert rows(db)[("kv", "k")] == first.kv_get("g1", "k")
