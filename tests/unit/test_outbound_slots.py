"""At most `limit` live migrations leave one host at once (vmjobs.migration.outbound_slot):
file locks in the shared spool, so the daemon and CLI processes share the limit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vmjobs.migration import MigrationFailed, outbound_slot


def test_a_second_migration_waits_for_the_slot_then_gives_up(tmp_path: Path) -> None:
    notes: list[str] = []
    with outbound_slot(tmp_path, "h1", 1, 5, notes.append) as slot:
        assert slot == 0
        with pytest.raises(MigrationFailed, match="h1 already has 1 outbound migration"), \
                outbound_slot(tmp_path, "h1", 1, 0.3, notes.append):
            pass
        # another host's slots are its own
        with outbound_slot(tmp_path, "h2", 1, 0.3, notes.append) as other:
            assert other == 0
    assert notes == ["waiting for an outbound migration slot on h1 (1 at a time)"]


def test_a_waiting_migration_goes_when_the_slot_frees(tmp_path: Path) -> None:
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with outbound_slot(tmp_path, "h1", 1, 5, lambda _m: None):
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    notes: list[str] = []
    threading.Timer(0.3, release.set).start()
    with outbound_slot(tmp_path, "h1", 1, 5, notes.append) as slot:
        assert slot == 0 and release.is_set()
    holder.join()
    assert len(notes) == 1


def test_a_limit_of_two_lets_two_go_at_once(tmp_path: Path) -> None:
    with outbound_slot(tmp_path, "h1", 2, 1, lambda _m: None) as first, \
            outbound_slot(tmp_path, "h1", 2, 1, lambda _m: None) as second:
        assert {first, second} == {0, 1}
        with pytest.raises(MigrationFailed), outbound_slot(tmp_path, "h1", 2, 0.2,
                                                          lambda _m: None):
            pass
