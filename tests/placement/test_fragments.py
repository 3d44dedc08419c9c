"""The fragmentation objective and offline snapshots: values worked out by hand."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import Allocation, Migrate, NodeShare, Repin, apply_plan, plan_rebalance
from placement.fragments import fragment_rate, objective_value, plan_fragments
from placement.snapshot import SnapshotError, cluster_from_snapshot, snapshot_of


def snap(nodes: dict[str, list[int]], jobs: list[tuple[str, str, int, int]]) -> dict:
    """hosts: name -> cpus per node (4 GiB each); jobs: (id, host, node, cpus), 100 MiB each."""
    return {
        "hosts": [{"name": h, "nodes": [{"id": i, "cpus": c, "memory_mib": 4096}
                                        for i, c in enumerate(cpus)]}
                  for h, cpus in nodes.items()],
        "jobs": [{"id": j, "host": h, "nodes": [{"node": n, "cpus": c, "memory_mib": 100}]}
                 for j, h, n, c in jobs],
    }


def test_fragment_rate_by_hand() -> None:
    # node a/0: 8 cpus, 3 used -> 5 free, 5 mod 4 = 1; a/1: 8 free, 0; b/0: 8 cpus, 6 used -> 2
    cluster = cluster_from_snapshot(snap({"a": [8, 8], "b": [8]},
                                         [("x", "a", 0, 3), ("y", "b", 0, 6)]))
    assert fragment_rate(cluster, 4) == pytest.approx((1 + 0 + 2) / (5 + 8 + 2))
    assert objective_value(cluster, "whole-nodes") == 1.0
    assert objective_value(cluster, "fragments", 4) == fragment_rate(cluster, 4)
    with pytest.raises(ValueError):
        fragment_rate(cluster, 0)


def test_one_move_completes_a_slot() -> None:
    """a/0 has 3 free of 8 (remainder 3 for S=4); moving its 1-cpu job into b/0's remainder
    (2 free) makes a/0 hold a whole 4-cpu slot: Σ remainders 3 + 2 -> 0 + 1."""
    cluster = cluster_from_snapshot(snap({"a": [8], "b": [8]},
                                         [("big", "a", 0, 4), ("one", "a", 0, 1),
                                          ("six", "b", 0, 6)]))
    plan = plan_rebalance(cluster, 1, objective="fragments", target_cpus=4)
    assert plan.found
    assert [(type(a), a.job_id, a.to_host) for a in plan.actions] == [(Migrate, "one", "b")]
    after = apply_plan(cluster, plan)
    assert fragment_rate(cluster, 4) == pytest.approx(5 / 5)
    assert fragment_rate(after, 4) == pytest.approx(1 / 5)


def test_a_set_of_moves_where_no_single_move_helps() -> None:
    """a/0: 2 free, two 1-cpu jobs; no single move completes a slot (2 + 1 < 4), both do.
    They land in b/0's remainder of 3 (b's 5-cpu job fits no remainder; b/1 is 4 free: a
    whole slot, never touched). Σ remainders 2 + 3 -> 0 + 1 over 9 free cpus."""
    cluster = cluster_from_snapshot(snap({"a": [8], "b": [8, 4]},
                                         [("one", "a", 0, 1), ("two", "a", 0, 1),
                                          ("four", "a", 0, 4), ("five", "b", 0, 5)]))
    assert plan_fragments(cluster, 1, 4).actions == ()
    plan = plan_fragments(cluster, 2, 4)
    assert sorted(a.job_id for a in plan.actions) == ["one", "two"]
    assert all(a.allocation is not None and a.allocation.host == "b"
               and a.allocation.nodes[0].node == 0 for a in plan.actions)
    assert fragment_rate(cluster, 4) == pytest.approx(5 / 9)
    assert fragment_rate(apply_plan(cluster, plan), 4) == pytest.approx(1 / 9)


def test_moves_inside_a_host_are_repins() -> None:
    cluster = cluster_from_snapshot(snap({"a": [8, 8]},
                                         [("one", "a", 0, 1), ("six", "a", 1, 6)]))
    plan = plan_fragments(cluster, 1, 8)
    assert [(type(a), a.job_id) for a in plan.actions] == [(Repin, "one")]
    assert plan.cost_mib == 100


def test_unmovable_jobs_stay_put_in_offline_plans() -> None:
    """A job written `"movable": false` (its live request names its host, or it holds
    hugepages or NICs) is not moved by an offline plan: the re-pin of "one" that the plan
    makes when it is movable is not made; the flag survives the round trip."""
    data = snap({"a": [8, 8]}, [("one", "a", 0, 1), ("six", "a", 1, 6)])
    assert [a.job_id for a in plan_fragments(cluster_from_snapshot(data), 1, 8).actions] \
        == ["one"]
    data["jobs"][0]["movable"] = False
    cluster = cluster_from_snapshot(data)
    # The planners may still move "six" to "one"'s node; never "one".
    assert "one" not in {a.job_id for a in plan_fragments(cluster, 1, 8).actions}
    assert "one" not in {a.job_id for a in plan_rebalance(cluster, 4).actions}
    assert snapshot_of(cluster)["jobs"][0] == data["jobs"][0]
    assert "movable" not in snapshot_of(cluster)["jobs"][1]


def test_a_job_held_without_a_request_is_written_unmovable() -> None:
    """The planners never move a job held without a request; its snapshot says so."""
    cluster = cluster_from_snapshot(snap({"a": [4]}, []))
    cluster.reserve("x", Allocation("a", (0,), 100, (NodeShare(0, (0,), 100),)))
    assert snapshot_of(cluster)["jobs"] == [
        {"id": "x", "host": "a", "nodes": [{"node": 0, "cpus": 1, "memory_mib": 100}],
         "movable": False}]


def test_snapshot_round_trip_and_errors() -> None:
    data = snap({"a": [4, 4]}, [("x", "a", 1, 2)])
    cluster = cluster_from_snapshot(data)
    assert snapshot_of(cluster) == data
    for bad, message in [
        ({"hosts": {}}, "hosts must be a list"),
        (snap({"a": [4]}, [("x", "b", 0, 1)]), "jobs[0].host: no host 'b' in the snapshot"),
        (snap({"a": [4]}, [("x", "a", 0, 5)]),
         "jobs[0].nodes[0]: node 0 of a has 4 cpus free, job x holds 5"),
        (snap({"a": [4]}, [("x", "a", 3, 1)]), "jobs[0].nodes[0].node: host a has no node 3"),
        ({**snap({"a": [4]}, []), "jobs": [{**snap({"a": [4]}, [("x", "a", 0, 1)])["jobs"][0],
                                            "movable": "no"}]},
         "jobs[0].movable must be true or false"),
    ]:
        with pytest.raises(SnapshotError) as err:
            cluster_from_snapshot(bad)
        assert str(err.value) == message


@st.composite
def snapshots(draw: st.DrawFn) -> dict:
    hosts = {f"h{i}": [8, 8] for i in range(draw(st.integers(1, 4)))}
    jobs = []
    for i in range(draw(st.integers(0, 20))):
        jobs.append((f"j{i}", draw(st.sampled_from(sorted(hosts))), draw(st.integers(0, 1)),
                     draw(st.sampled_from([1, 1, 2, 4]))))
    used: dict[tuple[str, int], int] = {}
    fitting = []
    for j, h, n, c in jobs:
        if used.get((h, n), 0) + c <= 8:
            used[(h, n)] = used.get((h, n), 0) + c
            fitting.append((j, h, n, c))
    return snap(hosts, fitting)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.integers(0, 6), st.sampled_from([2, 4, 8]))
def test_fragment_plans_never_make_it_worse(data: dict, moves: int, size: int) -> None:
    cluster = cluster_from_snapshot(data)
    plan = plan_fragments(cluster, moves, size)
    assert len(plan.actions) <= moves
    after = apply_plan(cluster, plan)
    assert fragment_rate(after, size) <= fragment_rate(cluster, size) + 1e-12
    assert plan.found == (fragment_rate(after, size) < fragment_rate(cluster, size))


@settings(max_examples=60, deadline=None)
@given(snapshots())
def test_snapshots_round_trip(data: dict) -> None:
    """Jobs come back in id order; nothing else changes."""
    again = snapshot_of(cluster_from_snapshot(data))
    assert again == {"hosts": data["hosts"], "jobs": sorted(data["jobs"], key=lambda j: j["id"])}
