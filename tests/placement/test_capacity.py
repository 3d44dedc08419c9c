"""placement.capacity: how many more jobs of one request fit on a host now, worked by hand."""

from __future__ import annotations

import pytest

from placement import Cluster, HostState, NumaPolicy, Request, UnknownHost, make_host
from placement.capacity import could_start, starts_possible


def test_counts_follow_cores_memory_nics_pool_and_state() -> None:
    # a: 2 nodes x 4 cores, 4 GiB a node, 1 NIC a node; b: 1 node x 2 cores, pool ci
    cluster = Cluster([make_host("a", nodes=2, cores=4, memory_mib=4096, nics_per_node=1),
                       make_host("b", nodes=1, cores=2, memory_mib=8192, pools=("ci",))])
    two = Request(cpus=2, memory_mib=1024, numa=NumaPolicy.STRICT)
    assert starts_possible(cluster, two, "a") == 4  # 2 a node, cores run out first
    assert starts_possible(cluster, two, "b") == 1
    fat = Request(cpus=1, memory_mib=3072, numa=NumaPolicy.STRICT)
    assert starts_possible(cluster, fat, "a") == 2  # memory runs out first: 1 a node
    nic = Request(cpus=1, memory_mib=256, nics=1)
    assert starts_possible(cluster, nic, "a") == 2 and starts_possible(cluster, nic, "b") == 0
    assert starts_possible(cluster, Request(cpus=1, memory_mib=256, pool="ci"), "a") == 0
    # what is held counts; the cluster itself is not changed by counting
    placed = cluster.place(two).allocation
    assert placed is not None
    cluster.reserve("j1", placed, two)
    before = {h: cluster.free(h) for h in ("a", "b")}
    assert starts_possible(cluster, two, "a") + starts_possible(cluster, two, "b") == 4
    assert {h: cluster.free(h) for h in ("a", "b")} == before
    cluster.set_state("b", HostState.CORDONED)
    assert starts_possible(cluster, two, "b") == 0
    assert starts_possible(cluster, two, "a", limit=2) == 2
    assert could_start(cluster, two) and not could_start(
        cluster, Request(cpus=5, memory_mib=256, numa=NumaPolicy.STRICT))
    with pytest.raises(UnknownHost):
        starts_possible(cluster, two, "nope")
