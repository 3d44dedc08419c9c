"""A failed member's init reports its job's exit over the control port (`vmjob-ctl ended N`,
images/init) before the guest powers off: the gang is poisoned at once, and a member that then
fails on that poison — even if its end is recorded first — is not the gang's first failure."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from placement import Request
from tests.unit.test_control import ask, gang
from vmjobs import gang as gangs
from vmjobs.control import GangState, MemberInfo
from vmjobs.controlhub import ControlHub
from vmjobs.daemon.gangwire import failed_first
from vmjobs.gang import Member
from vmjobs.jobs import JobRecord, JobState
from vmjobs.store import Store


def test_a_failed_exit_poisons_with_the_reason_the_recorded_end_gives() -> None:
    control = gang(2)
    assert ask(control, 1, "w1 barrier b 0") == []
    replies = ask(control, 0, "e1 ended 3")
    assert [r.line for r in replies] == ["e1 ok", "w1 err poisoned by node0 (h1): exit status 3"]
    assert control.state == GangState.POISONED and control.exit_reported == {0: 3}
    assert control.members[0].state == "failed"
    # the recorded end comes later: nothing more to answer, the first reason stays
    assert control.fail(0, "exit status 3") == []
    assert control.poison_reason == "poisoned by node0 (h1): exit status 3"


def test_a_clean_exit_poisons_nothing_and_bad_statuses_are_refused() -> None:
    control = gang(2)
    assert [r.line for r in ask(control, 0, "e1 ended 0")] == ["e1 ok"]
    assert control.state == GangState.OPEN and control.exit_reported == {}
    for bad in ("e2 ended", "e3 ended 256", "e4 ended -1", "e5 ended 1 2", "e6 ended 0001"):
        (reply,) = ask(control, 0, bad)
        assert reply.line.endswith("err usage: ended STATUS (0-255)"), reply
    assert control.state == GangState.OPEN


def member(index: int, state: JobState, code: int | None,
           stopped_by: str | None = None) -> Member:
    return Member(index, f"g.{index}", "h1", state, code, None, stopped_by)


def test_a_member_failing_on_the_poison_does_not_count_even_if_it_ended_first() -> None:
    # node1 failed on node0's poison and its end was recorded first (marked stopped_by g.0)
    result = gangs.outcome([member(0, JobState.COMPLETED, 3),
                            member(1, JobState.COMPLETED, 1, stopped_by="g.0")],
                           {"g.0": 20.0, "g.1": 10.0})
    assert (result.exit_code, result.failed and result.failed.job_id) == (3, "g.0")
    # ...unless node0 did not fail after all (a guest that said so and then exited 0)
    lied = gangs.outcome([member(0, JobState.COMPLETED, 0),
                          member(1, JobState.COMPLETED, 1, stopped_by="g.0")])
    assert (lied.exit_code, lied.failed and lied.failed.job_id) == (1, "g.1")


@pytest.fixture
def daemon(tmp_path: Path):  # noqa: ANN201 - the two parts failed_first reads, both real
    store = Store(tmp_path / "state.db")
    for index in range(3):
        store.submit(JobRecord(gangs.member_id("g", index), "alice", 1000, JobState.QUEUED,
                               gangs.member_spec({"argv": ["x"]}, "g", index, 3, "stop")),
                     Request(cpus=1, memory_mib=256), "test")
    hub = ControlHub()
    hub.open_gang("g", {i: MemberInfo(f"h{i + 1}") for i in range(3)})
    yield SimpleNamespace(store=store, control=hub)
    hub.shutdown()
    store.close()


def _report(daemon: SimpleNamespace, index: int, status: int) -> None:
    with daemon.control.lock:
        daemon.control.gangs["g"].control.request(index, f"e{index} ended {status}".encode())


def test_failed_first_names_the_earliest_reporter_whose_end_is_not_recorded(
        daemon: SimpleNamespace) -> None:
    record = {i: daemon.store.job(f"g.{i}") for i in range(3)}
    assert failed_first(daemon, record[1]) is None  # nobody reported
    _report(daemon, 2, 1)
    assert failed_first(daemon, record[1]) == "g.2"
    assert failed_first(daemon, record[2]) is None  # its own report: its own failure
    _report(daemon, 1, 1)  # node1 failed too, reported after node2: still node2's doing
    assert failed_first(daemon, record[1]) == "g.2"
    # once node2's end is recorded, it decided already: nobody is "first" for node1 any more
    daemon.store.transition("g.2", JobState.CANCELLED, "test")
    assert failed_first(daemon, record[1]) is None
