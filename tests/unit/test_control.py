"""The gang control service's state machine (vmjobs.control): barriers, batons, kv waits,
poison, timeouts, bounds, resends, and isolation between gangs."""

from __future__ import annotations

import pytest

from vmjobs.control import (
    MAX_LINE,
    MAX_PENDING,
    MAX_VALUE,
    RATE_BURST,
    BarrierState,
    GangControl,
    GangState,
    LineSplitter,
    MemberInfo,
    Reply,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gang(n: int = 2, clock: Clock | None = None, gang_id: str = "g1") -> GangControl:
    members = {i: MemberInfo(host=f"h{i + 1}", address=f"10.64.0.{i + 1}") for i in range(n)}
    return GangControl(gang_id, members, clock or Clock())


def ask(control: GangControl, index: int, line: str) -> list[Reply]:
    return control.request(index, line.encode())


def test_barrier_releases_all_when_the_last_arrives() -> None:
    control = gang(3)
    assert ask(control, 0, "a barrier start 0") == []
    assert ask(control, 2, "b barrier start 0") == []
    assert control.barriers["start"].state == BarrierState.WAITING
    replies = ask(control, 1, "c barrier start 0")
    assert sorted(replies, key=lambda r: r.index) == [
        Reply(0, "a ok start round 1"), Reply(1, "c ok start round 1"),
        Reply(2, "b ok start round 1")]
    assert control.barriers["start"].state == BarrierState.RELEASED
    # the same name again is its next round
    ask(control, 0, "d barrier start 0")
    ask(control, 2, "e barrier start 0")
    assert [r.line for r in ask(control, 1, "f barrier start 0")][-1].endswith("round 2")


def test_barrier_twice_by_one_member_is_refused() -> None:
    control = gang(2)
    ask(control, 0, "a barrier x 0")
    assert ask(control, 0, "b barrier x 0") == [Reply(0, "b err barrier x: already waiting")]


def test_barrier_timeout_names_the_missing_members() -> None:
    clock = Clock()
    control = gang(3, clock)
    ask(control, 0, "a barrier x 1500")
    ask(control, 1, "b barrier x 0")
    assert control.next_deadline() == pytest.approx(1001.5)
    clock.now += 1.4
    assert control.expire(clock.now) == []
    clock.now += 0.2
    assert control.expire(clock.now) == [
        Reply(0, "a err barrier x: timed out waiting for node2 (h3)")]
    # the member without a timeout still waits; the one who left must come again
    assert ask(control, 2, "c barrier x 0") == []
    assert sorted(r.index for r in ask(control, 0, "d barrier x 0")) == [0, 1, 2]


def test_poison_answers_every_wait_naming_the_member() -> None:
    control = gang(3)
    ask(control, 0, "a barrier x 0")
    ask(control, 1, "b baton take t")
    ask(control, 2, "c baton take t")  # waits behind node1
    ask(control, 0, "d kv get addr 1")
    replies = control.fail(1, "exit status 1")
    assert control.state == GangState.POISONED
    assert sorted(replies, key=lambda r: r.line) == [
        Reply(0, "a err poisoned by node1 (h2): exit status 1"),
        Reply(2, "c err poisoned by node1 (h2): exit status 1"),
        Reply(0, "d err poisoned by node1 (h2): exit status 1")]
    # later barrier/baton requests fail at once; kv and nodes still answer
    assert ask(control, 2, "e barrier y 0") == [
        Reply(2, "e err poisoned by node1 (h2): exit status 1")]
    assert ask(control, 2, "f baton take u")[0].line.startswith("f err poisoned by node1")
    assert ask(control, 2, "g kv set k v") == [Reply(2, "g ok")]
    assert ask(control, 2, "h kv get k 0") == [Reply(2, "h ok v")]
    # the first reason stays
    assert control.fail(0, "later") == []
    assert control.poison_reason == "poisoned by node1 (h2): exit status 1"


def test_poison_from_a_guest() -> None:
    control = gang(2)
    ask(control, 1, "a barrier x 0")
    replies = ask(control, 0, "b poison disk full on node0")
    assert Reply(0, "b ok") in replies
    assert Reply(1, "a err poisoned by node0 (h1): disk full on node0") in replies


def test_baton_passes_in_arrival_order() -> None:
    control = gang(3)
    assert ask(control, 0, "a baton take t") == [Reply(0, "a ok t")]
    assert ask(control, 2, "b baton take t") == []
    assert ask(control, 1, "c baton take t") == []
    assert ask(control, 1, "d baton pass t") == [Reply(1, "d err baton t: held by node0 (h1), "
                                                    "not you")]
    assert ask(control, 0, "e baton pass t") == [Reply(0, "e ok t"), Reply(2, "b ok t")]
    assert ask(control, 2, "f baton pass t") == [Reply(2, "f ok t"), Reply(1, "c ok t")]
    assert ask(control, 1, "g baton pass t") == [Reply(1, "g ok t")]
    assert control.batons["t"].holder is None


def test_kv_set_get_and_wait() -> None:
    control = gang(2)
    assert ask(control, 0, "a kv get addr 0") == [Reply(0, "a err no key addr")]
    assert ask(control, 0, "b kv get addr 1") == []
    assert ask(control, 1, "c kv set addr 10.64.0.2 port 80") == [
        Reply(1, "c ok"), Reply(0, "b ok 10.64.0.2 port 80")]
    assert ask(control, 0, "d kv get addr 0") == [Reply(0, "d ok 10.64.0.2 port 80")]
    # the host's side reads and writes the same store and wakes waiters
    assert control.get_key("addr") == "10.64.0.2 port 80"
    ask(control, 1, "e kv get token 1")
    assert control.set_key("token", "s3cret") == [Reply(1, "e ok s3cret")]


def test_nodes_lists_members() -> None:
    control = gang(2)
    assert ask(control, 1, "a nodes") == [
        Reply(1, "a data node0 h1 10.64.0.1 running"),
        Reply(1, "a data node1 h2 10.64.0.2 running"), Reply(1, "a ok 2 nodes")]


def test_a_request_sent_again_has_one_effect() -> None:
    control = gang(3)
    ask(control, 0, "a baton take t")
    ask(control, 1, "b baton take t")
    first = ask(control, 0, "c baton pass t")
    assert first == [Reply(0, "c ok t"), Reply(1, "b ok t")]
    # node0 heard nothing and sends the same request: the same answer, not a second pass
    assert ask(control, 0, "c baton pass t") == [Reply(0, "c ok t")]
    assert control.batons["t"].holder == 1
    # a waiting request sent again keeps waiting once; node1's woken answer is remembered
    ask(control, 2, "d barrier x 0")
    assert ask(control, 2, "d barrier x 0") == []
    assert ask(control, 1, "b baton take t") == [Reply(1, "b ok t")]


@pytest.mark.parametrize("line, error", [
    ("x" * (MAX_LINE + 1), "err request longer than"),
    ("a frobnicate", "err unknown request"),
    ("a barrier", "err usage: barrier NAME TIMEOUT_MS"),
    ("a barrier x -1", "err usage"),
    ("a barrier x 99999999999999", "err usage"),
    ("a barrier ../x 0", "err usage"),
    ("a baton steal t", "err usage"),
    ("a kv set k " + "v" * (MAX_VALUE + 1), "err bad value"),
    ("a kv set k\x01 v", "err malformed"),
    ("a kv get k maybe", "err usage"),
    ("a kv get " + "k" * 65 + " 0", "err bad key"),
    ("a nodes extra", "err usage"),
    ("a poison", "err usage"),
    ("!!! nodes", "- err malformed"),
    ("", "- err malformed"),
])
def test_bad_requests_are_answered_with_an_error(line: str, error: str) -> None:
    control = gang(2)
    replies = ask(control, 0, line)
    assert len(replies) == 1 and replies[0].index == 0
    assert error in replies[0].line
    assert control.state == GangState.OPEN and not control.kv


def test_open_waits_per_member_are_bounded() -> None:
    control = gang(2)
    for i in range(MAX_PENDING):
        assert ask(control, 0, f"w{i} kv get k{i} 1") == []
    assert ask(control, 0, "over barrier x 0") == [Reply(0, "over err at most 8 waits at once")]


def test_rate_limit_per_member() -> None:
    clock = Clock()
    control = gang(2, clock)
    answers = [ask(control, 0, f"r{i} kv get k 0")[0].line for i in range(int(RATE_BURST) + 5)]
    assert all("no key" in a for a in answers[:int(RATE_BURST)])
    assert all("too many requests" in a for a in answers[int(RATE_BURST):])
    # the other member is not held back; the first gets more after a while
    assert "no key" in ask(control, 1, "s kv get k 0")[0].line
    clock.now += 1.0
    assert "no key" in ask(control, 0, "t kv get k 0")[0].line


def test_gangs_are_isolated() -> None:
    """Two gangs' states share nothing: a key, a barrier or poison in one is not seen in the
    other (the hub keys each port to one gang; here, two states side by side)."""
    first, second = gang(2, gang_id="g1"), gang(2, gang_id="g2")
    ask(first, 0, "a kv set secret 42")
    assert ask(second, 0, "b kv get secret 0") == [Reply(0, "b err no key secret")]
    ask(first, 0, "c barrier x 0")
    assert ask(second, 1, "d barrier x 0") == []  # waits for g2's node0, not g1's
    first.fail(1, "exit status 1")
    assert second.state == GangState.OPEN
    assert sorted(r.line for r in ask(second, 0, "e barrier x 0")) == [
        "d ok x round 1", "e ok x round 1"]


def test_requests_from_an_unknown_member_are_dropped() -> None:
    assert gang(2).request(5, b"a nodes") == []


def test_line_splitter_is_bounded() -> None:
    lines = LineSplitter(8)
    assert lines.feed(b"ab") == []
    assert lines.feed(b"c\nde\n") == [b"abc", b"de"]
    # an overlong line comes out cut at 9 bytes once; the rest up to its newline is dropped
    assert lines.feed(b"0123456789abcdef") == [b"012345678"]
    assert lines.feed(b"ghij" * 1000) == []
    assert lines.feed(b"k\nok\n") == [b"ok"]
    assert len(lines.buffer) == 0


def restarted(control: GangControl) -> GangControl:
    """A new daemon's state for the gang: a fresh GangControl taking up `durable`'s rows."""
    fresh = gang(len(control.members), gang_id=control.gang_id)
    fresh.restore(dict(control.durable()))
    return fresh


def test_the_durable_state_outlives_a_restart() -> None:
    control = gang(3)
    ask(control, 0, "a kv set addr node0:5000")
    ask(control, 1, "b baton take t")
    for index, req in ((0, "c"), (1, "d"), (2, "e")):
        ask(control, index, f"{req} barrier start 0")
    after = restarted(control)
    # kv, the baton's holder and the barrier's round carry over
    assert ask(after, 2, "f kv get addr 0") == [Reply(2, "f ok node0:5000")]
    assert ask(after, 2, "g baton take t") == []  # node1 holds it still: node2 waits
    assert ask(after, 1, "h baton pass t") == [Reply(1, "h ok t"), Reply(2, "g ok t")]
    ask(after, 0, "i barrier start 0")
    ask(after, 1, "j barrier start 0")
    assert ask(after, 2, "k barrier start 0")[-1].line == "k ok start round 2"


def test_an_answer_lost_in_a_restart_is_given_again_not_redone() -> None:
    # node1 took the baton; the daemon died before its `ok` reached the guest, which sends
    # the same request to the new daemon: the same answer, not "you hold it already"
    control = gang(2)
    assert ask(control, 1, "b baton take t") == [Reply(1, "b ok t")]
    ask(control, 0, "a barrier x 0")
    released = ask(control, 1, "c barrier x 0")
    assert len(released) == 2
    after = restarted(control)
    assert ask(after, 1, "b baton take t") == [Reply(1, "b ok t")]
    # a barrier answered before the restart is answered again, not a new round
    assert ask(after, 0, "a barrier x 0") == [Reply(0, "a ok x round 1")]


def test_a_poisoned_gang_stays_poisoned_after_a_restart() -> None:
    control = gang(2)
    control.fail(1, "exit status 1")
    after = restarted(control)
    assert after.state == GangState.POISONED
    assert ask(after, 0, "a barrier x 0") == [
        Reply(0, "a err poisoned by node1 (h2): exit status 1")]


def test_restore_skips_rows_that_do_not_fit_the_gang() -> None:
    control = gang(2)
    control.restore({("kv", "../etc"): "x", ("kv", "ok"): "v", ("baton", "t"): "7",
                     ("answer", "9:a"): "a ok", ("answer", "0:a"): "a ok x",
                     ("frobs", "x"): "y", ("round", "b"): "x"})
    assert control.kv == {"ok": "v"}
    assert control.batons == {}
    assert control.answered == {0: {"a": ["a ok x"]}}
    assert control.barriers == {}
