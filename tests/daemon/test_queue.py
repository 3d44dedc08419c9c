"""The queue policy over real engine snapshots: FIFO within priority, EASY backfill, reasons."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import placement
from placement import Cpu, Host, HostState, Node, Request
from placement.gang import apart_groups
from vmjobs.daemon.queue import Holding, Planner, Waiting, group_gangs, order, plan

NOW = 1_000_000.0


def host(name: str = "a", cpus: int = 4, memory_mib: int = 8192) -> Host:
    return Host(name, (Node(0, tuple(Cpu(i, i, 0, frozenset({i})) for i in range(cpus)),
                            memory_mib),))


def hold(cluster: placement.Cluster, job_id: str, cpus: int) -> None:
    decision = cluster.place(Request(cpus=cpus, memory_mib=256))
    assert decision.allocation is not None
    cluster.reserve(job_id, decision.allocation)


def wait(job_id: str, cpus: int, limit: float | None = None, priority: int = 0) -> Waiting:
    return Waiting(job_id, Request(cpus=cpus, memory_mib=256, priority=priority), limit)


def started(result_plan: object) -> list[str]:
    return [s.job_id for s in result_plan.starts]  # type: ignore[attr-defined]


def test_fifo_until_the_first_that_does_not_fit() -> None:
    cluster = placement.Cluster([host(cpus=2)])
    result = plan(cluster, [wait(f"j{i}", 1) for i in range(5)], [], NOW)
    assert started(result) == ["j0", "j1"]
    assert [(w.job_id, w.position) for w in result.waits] == [("j2", 1), ("j3", 2), ("j4", 3)]
    assert result.waits[0].reason.startswith("first in line: ")
    assert cluster.allocations() == {}  # the snapshot handed in is not changed


def test_priority_first_then_submission_order() -> None:
    queue = [wait("low1", 1), wait("high", 1, priority=5), wait("low2", 1),
             wait("mid", 1, priority=1)]
    assert [w.job_id for w in order(queue)] == ["high", "mid", "low1", "low2"]
    result = plan(placement.Cluster([host(cpus=2)]), queue, [], NOW)
    assert started(result) == ["high", "mid"]


def test_backfill_only_when_it_ends_before_the_head_is_due() -> None:
    cluster = placement.Cluster([host(cpus=5)])
    hold(cluster, "r1", 2)  # ends in 100 s
    hold(cluster, "r2", 1)  # no limit
    holding = [Holding("r1", NOW + 100), Holding("r2", None)]
    queue = [wait("big", 4), wait("short", 1, limit=50), wait("long", 1, limit=500),
             wait("open", 1)]
    result = plan(cluster, queue, holding, NOW)
    assert started(result) == ["short"]
    assert result.shadow == NOW + 100
    reasons = {w.job_id: w.reason for w in result.waits}
    assert "would delay big" in reasons["long"]
    assert "--time-limit would let it start early" in reasons["open"]


def test_backfill_beside_the_head_when_it_leaves_the_head_room() -> None:
    cluster = placement.Cluster([host(cpus=4)])
    hold(cluster, "r1", 3)  # the head needs 2: at r1's end 4 are free, so 2 may run beside
    queue = [wait("head", 2), wait("side1", 1), wait("side2", 1), wait("side3", 1)]
    result = plan(cluster, queue, [Holding("r1", NOW + 60)], NOW)
    assert started(result) == ["side1"]  # only 1 cpu is free now
    cluster2 = placement.Cluster([host(cpus=6)])
    hold(cluster2, "r1", 4)
    queue2 = [wait("head", 3), wait("side1", 1), wait("side2", 1), wait("side3", 1)]
    result2 = plan(cluster2, queue2, [Holding("r1", NOW + 60)], NOW)
    # 2 free now; at r1's end 6 free: side1 and side2 still leave the head its 3
    assert started(result2) == ["side1", "side2"]


def test_no_backfill_when_the_head_waits_for_jobs_without_limits() -> None:
    cluster = placement.Cluster([host(cpus=2)])
    hold(cluster, "r1", 1)
    result = plan(cluster, [wait("head", 2), wait("small", 1, limit=1)],
                  [Holding("r1", None)], NOW)
    assert started(result) == []
    assert "without a time limit" in result.waits[1].reason


def test_head_waiting_for_a_down_host_does_not_block_others() -> None:
    cluster = placement.Cluster([host("a", cpus=2), host("b", cpus=2)])
    cluster.set_state("b", HostState.DOWN)
    pinned = Waiting("pinned", Request(cpus=1, memory_mib=256, host="b"))
    result = plan(cluster, [pinned, wait("other", 1)], [], NOW)
    assert started(result) == ["other"]
    assert result.waits[0].job_id == "pinned"


def test_a_stream_of_small_jobs_never_overtakes_a_large_head() -> None:
    cluster = placement.Cluster([host(cpus=4)])
    hold(cluster, "r1", 3)  # no time limit: when the head may start is unknown
    queue = [wait("big", 4)] + [wait(f"s{i}", 1) for i in range(200)]
    result = plan(cluster, queue, [Holding("r1", None)], NOW)
    assert started(result) == []  # the one free cpu is kept for the head
    assert [w.position for w in result.waits] == list(range(1, 202))
    assert len({w.reason for w in result.waits[1:]}) == 1  # alike jobs, one explanation
    assert "would delay big" in result.waits[1].reason


def test_alike_jobs_that_do_not_fit_share_the_reason() -> None:
    cluster = placement.Cluster([host(cpus=2)])
    hold(cluster, "r1", 2)
    result = plan(cluster, [wait("head", 2)] + [wait(f"s{i}", 1) for i in range(50)],
                  [Holding("r1", NOW + 10)], NOW)
    assert started(result) == []
    reasons = {w.reason for w in result.waits[1:]}
    assert len(reasons) == 1 and "0 free cores" in reasons.pop()


def test_holdings_are_read_only_when_some_job_waits() -> None:
    asked: list[int] = []

    def holding() -> list[Holding]:
        asked.append(1)
        return [Holding("r1", NOW + 10)]

    cluster = placement.Cluster([host(cpus=2)])
    assert started(plan(cluster, [wait("a", 1), wait("b", 1)], holding, NOW)) == ["a", "b"]
    assert asked == []
    hold(cluster, "r1", 2)
    assert started(plan(cluster, [wait("a", 1)], holding, NOW)) == []
    assert asked == [1]


@settings(max_examples=80)
@given(held=st.lists(st.tuples(st.integers(1, 3), st.one_of(st.none(), st.integers(1, 200))),
                     max_size=5),
       queue=st.lists(st.tuples(st.integers(1, 4), st.one_of(st.none(), st.integers(1, 300))),
                      min_size=1, max_size=12),
       cut=st.integers(0, 12))
def test_carrying_a_pass_on_with_new_jobs_decides_as_planning_it_all(
        held: list[tuple[int, int | None]], queue: list[tuple[int, int | None]],
        cut: int) -> None:
    """The scheduler carries its last pass on with the jobs submitted since, when nothing
    else changed (`Planner.offer`): that must decide them exactly as a whole new pass."""
    cluster = placement.Cluster([host("a", cpus=4), host("b", cpus=6)])
    holding = []
    for k, (cpus, ends) in enumerate(held):
        decision = cluster.place(Request(cpus=cpus, memory_mib=256))
        if decision.allocation is not None:
            cluster.reserve(f"r{k}", decision.allocation)
            holding.append(Holding(f"r{k}", None if ends is None else NOW + ends))
    jobs = [wait(f"j{k}", cpus, limit) for k, (cpus, limit) in enumerate(queue)]
    whole = plan(cluster, jobs, holding, NOW)
    planner = Planner(cluster, holding)
    first = planner.offer(jobs[:cut], NOW)
    rest = planner.offer(jobs[cut:], NOW)
    assert first.starts + rest.starts == whole.starts
    assert first.waits + rest.waits == whole.waits
    assert cluster.allocations() == {h.job_id: cluster.allocation_of(h.job_id)
                                     for h in holding}  # not changed


# --- job arrays: at most N of an array running (`--array ...%N`) ----------------------------


def member(array: str, index: int, limit: int | None, cpus: int = 1) -> Waiting:
    return Waiting(f"{array}_{index}", Request(cpus=cpus, memory_mib=256), None,
                   array=array, array_limit=limit)


def test_array_limit_starts_at_most_n_and_holds_the_rest() -> None:
    cluster = placement.Cluster([host(cpus=8)])
    result = plan(cluster, [member("a", i, 3) for i in range(6)], [], NOW)
    assert started(result) == ["a_0", "a_1", "a_2"]  # room for 8, the limit says 3
    assert [(w.job_id, w.held) for w in result.waits] == [("a_3", True), ("a_4", True),
                                                          ("a_5", True)]
    assert "at most 3 at once (%3)" in result.waits[0].reason
    assert "3 of array a running" in result.waits[0].reason


def test_array_limit_counts_the_arrays_running_jobs() -> None:
    cluster = placement.Cluster([host(cpus=8)])
    result = plan(cluster, [member("a", i, 3) for i in range(2, 6)], [], NOW,
                  running={"a": 2})
    assert started(result) == ["a_2"]  # 2 run already: one more
    result = plan(cluster, [member("a", i, 3) for i in range(3, 6)], [], NOW,
                  running={"a": 3})
    assert started(result) == []
    assert all(w.held for w in result.waits)


def test_held_array_jobs_block_no_one_behind_them() -> None:
    # other users' jobs queued after a held array start at once, in queue order, and none of
    # the held jobs is taken for the head (nothing to make room for)
    cluster = placement.Cluster([host(cpus=4)])
    queue = [*(member("a", i, 1) for i in range(3)), wait("other1", 1), wait("other2", 1)]
    result = plan(cluster, queue, [], NOW)
    assert started(result) == ["a_0", "other1", "other2"]
    assert [(w.job_id, w.position, w.held) for w in result.waits] == [
        ("a_1", 1, True), ("a_2", 2, True)]


def test_held_jobs_come_after_the_head_and_limits_apply_to_backfill() -> None:
    cluster = placement.Cluster([host(cpus=2)])
    hold(cluster, "r1", 1)
    queue = [member("a", 0, 1, cpus=1), wait("big", 2), member("a", 1, 1, cpus=1),
             member("b", 0, None, cpus=1)]
    result = plan(cluster, queue, [Holding("r1", None)], NOW)
    assert started(result) == ["a_0"]  # the only free cpu, in queue order
    waits = [(w.job_id, w.position, w.held) for w in result.waits]
    assert waits[0] == ("big", 1, False)  # the head is the first that needs room
    assert ("a_1", 2, True) in waits  # held by its limit (1 running), not by room
    assert ("b_0", 3, False) in waits  # an array without a limit is not held


def test_arrays_are_limited_each_on_its_own() -> None:
    cluster = placement.Cluster([host(cpus=8)])
    queue = [member("a", 0, 1), member("b", 0, 2), member("a", 1, 1), member("b", 1, 2),
             member("b", 2, 2)]
    result = plan(cluster, queue, [], NOW, running={"b": 1})
    assert started(result) == ["a_0", "b_0"]
    assert {w.job_id for w in result.waits} == {"a_1", "b_1", "b_2"}


# --- gangs: N members placed together, waiting as one job (`--nodes N`) ----------------------


def gang_members(gang: str, size: int, cpus: int = 1, limit: float | None = None,
                 per_host: int | None = 1) -> list[Waiting]:
    groups = apart_groups(gang, size, per_host)
    return [Waiting(f"{gang}.{i}", Request(cpus=cpus, memory_mib=256, anti_affinity=groups[i]),
                    limit, gang=gang) for i in range(size)]


def test_group_gangs_gathers_members_at_the_first_ones_place() -> None:
    queue = [wait("a", 1), *gang_members("g", 2)[:1], wait("b", 1), *gang_members("g", 2)[1:]]
    grouped = group_gangs(queue)
    assert [w.job_id for w in grouped] == ["a", "g", "b"]
    assert [m for m, _ in grouped[1].members] == ["g.0", "g.1"]


def test_a_gang_starts_whole_on_distinct_hosts() -> None:
    cluster = placement.Cluster([host("a", cpus=2), host("b", cpus=2)])
    result = plan(cluster, gang_members("g", 2), [], NOW)
    assert sorted(started(result)) == ["g.0", "g.1"]
    assert len({s.allocation.host for s in result.starts}) == 2


def test_a_gang_that_does_not_fit_whole_starts_no_member() -> None:
    cluster = placement.Cluster([host("a", cpus=2), host("b", cpus=2)])
    hold(cluster, "r1", 2)  # host a full: one member would fit on b, the gang does not
    # a 2-cpu job would take b whole: the gang could then never have two hosts
    result = plan(cluster, [*gang_members("g", 2), wait("small", 2)], [Holding("r1", None)],
                  NOW)
    assert started(result) == []
    assert result.waits[0].job_id == "g" and result.waits[0].position == 1
    assert "gang of 2" in result.waits[0].reason
    waits = result.member_waits({"g": ["g.0", "g.1"]})
    assert waits["g.0"].position == waits["g.1"].position == 1
    assert "would delay g" in waits["small"].reason


def test_a_gang_at_the_head_is_never_overtaken_by_a_stream_of_one_node_jobs() -> None:
    cluster = placement.Cluster([host("a", cpus=2), host("b", cpus=2), host("c", cpus=2)])
    hold(cluster, "r1", 2)  # on a, ends in 100 s
    holding = [Holding("r1", NOW + 100)]
    # a gang of 3 needs every host; b and c are free now, so each 1-node job would fit
    queue = [*gang_members("g", 3, cpus=2), *(wait(f"s{i}", 1) for i in range(200))]
    result = plan(cluster, queue, holding, NOW)
    assert started(result) == []
    assert result.shadow == NOW + 100
    assert all("would delay g" in w.reason for w in result.waits[1:])
    # jobs that end before the gang is due still backfill
    short = plan(cluster, [*gang_members("g", 3, cpus=2), wait("quick", 1, limit=50)],
                 holding, NOW)
    assert started(short) == ["quick"]


def test_backfill_counts_the_whole_gang() -> None:
    """Hosts a, b of 2 cpus: r1 fills a until NOW+100, r2 holds one cpu of b for good. The
    gang's 2 members of 1 cpu must be apart: at the shadow time they need a and b's last cpu.
    A 1-cpu job fits on b now; counting one member only (1 cpu, a is free then) it would be
    let in, counting the whole gang it would delay it."""
    cluster = placement.Cluster([host("a", cpus=2), host("b", cpus=2)])
    hold(cluster, "r1", 2)
    hold(cluster, "r2", 1)
    holding = [Holding("r1", NOW + 100), Holding("r2", None)]
    result = plan(cluster, [*gang_members("g", 2), wait("open", 1)], holding, NOW)
    assert started(result) == []
    assert result.shadow == NOW + 100
    assert "would delay g" in result.waits[1].reason
    one = plan(cluster, [wait("single", 1, limit=None), wait("open", 1)], holding, NOW)
    assert started(one) == ["single"]  # contrast: a lone 1-cpu job fits on b at once


def test_a_gang_backfills_only_whole() -> None:
    cluster = placement.Cluster([host("a", cpus=4), host("b", cpus=2), host("c", cpus=2)])
    hold(cluster, "r1", 3)  # on a until NOW+100
    holding = [Holding("r1", NOW + 100)]
    # head: 4 cpus, due at NOW+100 on a; a gang of 2 that ends before then fills b and c
    result = plan(cluster, [wait("big", 4), *gang_members("g", 2, cpus=2, limit=60)],
                  holding, NOW)
    assert sorted(started(result)) == ["g.0", "g.1"]
    assert all(s.backfilled for s in result.starts)


@settings(max_examples=60)
@given(held=st.lists(st.tuples(st.integers(1, 3), st.one_of(st.none(), st.integers(1, 200))),
                     max_size=4),
       queue=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3),
                                st.one_of(st.none(), st.integers(1, 300))),
                      min_size=1, max_size=8),
       cut=st.integers(0, 8))
def test_carrying_a_pass_on_with_gangs_decides_as_planning_it_all(
        held: list[tuple[int, int | None]], queue: list[tuple[int, int, int | None]],
        cut: int) -> None:
    """As above, with gangs in the queue (entries of 1 to 3 members apart): the scheduler
    offers the grouped queue in two parts; never a partial gang either way."""
    cluster = placement.Cluster([host("a", cpus=4), host("b", cpus=4), host("c", cpus=2)])
    holding = []
    for k, (cpus, ends) in enumerate(held):
        decision = cluster.place(Request(cpus=cpus, memory_mib=256))
        if decision.allocation is not None:
            cluster.reserve(f"r{k}", decision.allocation)
            holding.append(Holding(f"r{k}", None if ends is None else NOW + ends))
    jobs: list[Waiting] = []
    for k, (size, cpus, limit) in enumerate(queue):
        jobs += gang_members(f"g{k}", size, cpus, limit) if size > 1 else \
            [wait(f"j{k}", cpus, limit)]
    whole = plan(cluster, jobs, holding, NOW)
    grouped = group_gangs(order(jobs))
    planner = Planner(cluster, holding)
    first = planner.offer(grouped[:cut], NOW)
    rest = planner.offer(grouped[cut:], NOW)
    assert first.starts + rest.starts == whole.starts
    assert first.waits + rest.waits == whole.waits
    started = {s.job_id for s in whole.starts}
    for entry in grouped:  # all members of a gang or none
        ids = {m for m, _ in entry.members}
        assert not ids or ids <= started or not ids & started
        hosts = [s.allocation.host for s in whole.starts if s.job_id in ids]
        assert len(hosts) == len(set(hosts))  # apart
