"""Gang placement (`placement.gang`): all members or none, members apart on distinct hosts (or
at most K per host), the cluster handed in never changed."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from placement import Cluster, Request, make_host
from placement.gang import apart_groups, gang_never_fits, place_gang, with_groups


def cluster_of(cpus: list[int]) -> Cluster:
    return Cluster([make_host(f"h{i}", nodes=1, cores=c, memory_mib=8192)
                    for i, c in enumerate(cpus)])


def gang(size: int, per_host: int | None = 1, cpus: int = 1, gang_id: str = "g") -> list[Request]:
    return with_groups([Request(cpus=cpus, memory_mib=256)] * size,
                       apart_groups(gang_id, size, per_host))


def test_two_apart_members_go_to_two_hosts() -> None:
    decision = place_gang(cluster_of([4, 4, 4]), gang(2))
    assert decision.allocations is not None
    assert len({a.host for a in decision.allocations}) == 2


def test_more_apart_members_than_hosts_places_none() -> None:
    cluster = cluster_of([8, 8])
    decision = place_gang(cluster, gang(3), names=["g.0", "g.1", "g.2"])
    assert decision.allocations is None
    assert "beside the 2 placed before it" in decision.reason
    assert "g." in decision.reason
    assert cluster.allocations() == {}
    # together they fit on one host
    assert place_gang(cluster, gang(3, per_host=None)).fits


def test_per_host_limit() -> None:
    decision = place_gang(cluster_of([8, 8]), gang(4, per_host=2))
    assert decision.allocations is not None
    assert sorted(Counter(a.host for a in decision.allocations).values()) == [2, 2]
    assert not place_gang(cluster_of([8, 8]), gang(5, per_host=2)).fits


def test_apart_from_members_already_running() -> None:
    """A member placed again (a requeued member, a migration) keeps away from the running
    ones: the group is in the cluster's ledger."""
    cluster = cluster_of([4, 4])
    requests = gang(2)
    first = cluster.place(requests[0])
    assert first.allocation is not None
    cluster.reserve("g.0", first.allocation, requests[0])
    again = place_gang(cluster, requests[1:])
    assert again.allocations is not None
    assert again.allocations[0].host != first.allocation.host


def test_largest_member_first() -> None:
    """A 4-cpu member and a 1-cpu one on hosts of 4 and 1 free cpus: placed in index order
    the small one could take the big host; largest first places both."""
    cluster = cluster_of([4, 1])
    members = with_groups([Request(cpus=1, memory_mib=256), Request(cpus=4, memory_mib=256)],
                          apart_groups("g", 2, 1))
    decision = place_gang(cluster, members)
    assert decision.allocations is not None
    assert [a.host for a in decision.allocations] == ["h1", "h0"]  # in the members' order


def test_never_fits() -> None:
    assert gang_never_fits(cluster_of([4, 4]), gang(3)) is not None
    assert gang_never_fits(cluster_of([4, 4]), gang(2, cpus=8)) is not None
    assert gang_never_fits(cluster_of([4, 4]), gang(2)) is None
    assert gang_never_fits(cluster_of([4, 4]), gang(3, per_host=None)) is None


@given(hosts=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       held=st.lists(st.integers(1, 4), max_size=6),
       members=st.lists(st.integers(1, 4), min_size=1, max_size=6),
       per_host=st.one_of(st.none(), st.integers(1, 3)))
def test_all_or_nothing_and_apart(hosts: list[int], held: list[int], members: list[int],
                                  per_host: int | None) -> None:
    cluster = cluster_of(hosts)
    for i, cpus in enumerate(held):  # some room already taken
        decision = cluster.place(Request(cpus=cpus, memory_mib=256))
        if decision.allocation is not None:
            cluster.reserve(f"r{i}", decision.allocation)
    before = cluster.allocations()
    requests = with_groups([Request(cpus=c, memory_mib=256) for c in members],
                           apart_groups("g", len(members), per_host))
    decision = place_gang(cluster, requests)
    assert cluster.allocations() == before  # nothing reserved by the decision itself
    if decision.allocations is None:
        # never partial: a greedy failure is not a proof, but no single member is promised
        assert decision.reason
        return
    assert len(decision.allocations) == len(members)
    work = cluster.copy()
    for i, (request, allocation) in enumerate(zip(requests, decision.allocations, strict=True)):
        assert len(allocation.cpus) == request.cpus
        work.reserve(f"g.{i}", allocation, request)  # Conflict if two members overlap
    if per_host is not None:
        assert max(Counter(a.host for a in decision.allocations).values()) <= per_host
    # the gang fits exactly when every member, reserved together, fits: free cpus suffice
    free = sum(cluster.free(h).cpus_free for h in cluster.hosts)
    assert sum(members) <= free


def test_rebalance_never_puts_apart_members_together() -> None:
    """Two hosts, one member on each: emptying a host (rebalance's whole-nodes objective)
    would move one member onto the other's host; apart members are never moved so (drain and
    rebalance place a member's own request, with its group)."""
    from placement import plan_rebalance

    def two_on_two(groups: list[str | None]) -> Cluster:
        cluster = cluster_of([4, 4])
        requests = with_groups([Request(cpus=1, memory_mib=256)] * 2, groups)
        for i, request in enumerate(requests):
            decision = cluster.place_within(request, exclude=frozenset({f"h{1 - i}"}))
            assert decision.allocation is not None
            cluster.reserve(f"g.{i}", decision.allocation, request)
        return cluster

    apart = plan_rebalance(two_on_two(apart_groups("g", 2, 1)), max_moves=4)
    assert apart.actions == ()
    together = plan_rebalance(two_on_two([None, None]), max_moves=4)
    assert len(together.actions) == 1  # the same jobs without the group: one is moved
