"""Each scorer alone, then what the policies do with them."""

from __future__ import annotations

import pytest

from placement import Allocation, Cluster, Host, NodeShare, Request
from placement import scorers as s
from placement.fit import Option
from placement.ledger import HostLedger, claim, empty_ledger
from placement.need import need_of
from placement.synthetic import make_host

NEED = need_of(Request(2, 1024))


def half_used() -> HostLedger:
    """Two nodes of 4 cores / 4 GiB / 1 NIC; node0 has 2 cores and 1 GiB taken."""
    led = empty_ledger(make_host("a", nodes=2, cores=4, memory_mib=4096, nics_per_node=1))
    claim(led, Allocation("a", (0, 1), 1024, (NodeShare(0, (0, 1), 1024),)), "j", +1)
    return led


def on(node: int, cpus: int = 2, mem: int = 1024) -> Option:
    return Option("a", ((node, cpus, mem),), ())


def test_best_and_worst_fit() -> None:
    led = half_used()
    assert s.best_fit(led, NEED, on(0)) == 1.0  # node0 left with 0 of 4 free
    assert s.best_fit(led, NEED, on(1)) == 0.5
    assert s.worst_fit(led, NEED, on(1)) == 0.5


def test_keeps_nodes_and_hosts_whole() -> None:
    led = half_used()
    assert s.keeps_nodes_whole(led, NEED, on(0)) == 1.0
    assert s.keeps_nodes_whole(led, NEED, on(1)) == 0.0
    spans = Option("a", ((0, 1, 512), (1, 1, 512)), ())
    assert s.keeps_nodes_whole(led, NEED, spans) == 0.5
    assert s.keeps_hosts_whole(led, NEED, on(1)) == 1.0
    fresh = empty_ledger(make_host("b", nodes=1, cores=4))
    assert s.keeps_hosts_whole(fresh, NEED, on(0)) == 0.0
    assert s.empty_hosts(fresh, NEED, on(0)) == 1.0


def test_balanced() -> None:
    led = half_used()
    # node0 after: 0/4 cpus, 2/4 GiB free -> gap 0.5; node1 after: 2/4 cpus, 3/4 GiB -> 0.25
    assert s.balanced(led, NEED, on(0)) == pytest.approx(0.5)
    assert s.balanced(led, NEED, on(1)) == pytest.approx(0.75)


def test_saves_nics_and_fewest_nodes() -> None:
    led = half_used()
    assert s.saves_nics(led, NEED, on(0)) == 0.5
    assert s.saves_nics(led, need_of(Request(1, 1, nics=1)), on(0)) == 1.0
    no_nics = empty_ledger(make_host("b", nodes=1, cores=4))
    assert s.saves_nics(no_nics, NEED, on(0)) == 1.0
    assert s.fewest_nodes(led, NEED, Option("a", ((0, 1, 1), (1, 1, 1)), ())) == 0.5


def filled(hosts: list[Host], jobs: list[tuple[str, Request]]) -> Cluster:
    cluster = Cluster(hosts)
    for job, request in jobs:
        alloc = cluster.place(request).allocation
        assert alloc is not None
        cluster.reserve(job, alloc, request)
    return cluster


def test_pack_fills_the_fullest_node_and_keeps_empty_hosts_empty() -> None:
    cluster = filled([make_host(n, nodes=2, cores=8) for n in "abc"],
                     [("j1", Request(6, 1024, host="b"))])
    alloc = cluster.place(Request(2, 1024)).allocation
    assert alloc is not None and (alloc.host, alloc.nodes[0].node) == ("b", 0)


def test_spread_picks_the_emptiest_host() -> None:
    cluster = filled([make_host(n, nodes=2, cores=8) for n in "abc"],
                     [("j1", Request(6, 1024, host="a")), ("j2", Request(1, 1024, host="b"))])
    alloc = cluster.place(Request(2, 1024), policy="spread").allocation
    assert alloc is not None and alloc.host == "c"


def test_firstfit_takes_host_order() -> None:
    cluster = filled([make_host(n, nodes=2, cores=8) for n in "cab"],
                     [("j1", Request(6, 1024, host="a"))])
    alloc = cluster.place(Request(2, 1024), policy="firstfit").allocation
    assert alloc is not None and (alloc.host, alloc.nodes[0].node) == ("c", 0)


def test_pack_keeps_nic_nodes_for_nic_jobs() -> None:
    cluster = Cluster([make_host("a", nodes=2, cores=8, nics_per_node=1),
                       make_host("b", nodes=2, cores=8)])
    alloc = cluster.place(Request(2, 1024)).allocation
    assert alloc is not None and alloc.host == "b"


def test_prefer_uses_one_node_anywhere_before_spanning() -> None:
    cluster = Cluster([make_host("a", nodes=2, cores=4), make_host("b", nodes=2, cores=4)])
    cluster.reserve("j1", Allocation("b", (0, 1), 100, (NodeShare(0, (0, 1), 100),)))
    cluster.reserve("j2", Allocation("b", (4, 5), 100, (NodeShare(1, (4, 5), 100),)))
    # b has 4 free cpus split 2+2 (spanning fits), a has whole nodes: prefer takes a single node.
    alloc = cluster.place(Request(4, 100)).allocation
    assert alloc is not None and alloc.host == "a" and len(alloc.nodes) == 1
