"""Every explanation message, as the CLI will print it."""

from __future__ import annotations

from dataclasses import replace

from placement import (
    Allocation,
    Cluster,
    Device,
    HostState,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
)
from placement.synthetic import make_host

STRICT, ANY = NumaPolicy.STRICT, NumaPolicy.ANY


def two() -> Cluster:
    return Cluster([make_host("a", nodes=2, cores=2, memory_mib=4000, nics_per_node=1),
                    make_host("b", nodes=2, cores=2, memory_mib=4000)])


def summary(cluster: Cluster, request: Request) -> str:
    explanation = cluster.explain(request)
    assert explanation == cluster.place(request).explanation
    return explanation.summary


def test_never_fits_cores_strict() -> None:
    got = two().explain(Request(4, 100, numa=STRICT))
    assert got.never_fits and not got.fits
    assert got.summary == (
        "largest NUMA node on any host has 2 cores; asked for 4 with --numa strict")


def test_never_fits_memory_strict() -> None:
    assert summary(two(), Request(1, 65536, numa=STRICT)) == (
        "largest NUMA node on any host has 3.9 GiB of memory; "
        "asked for 64 GiB with --numa strict")


def test_never_fits_isolate() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=2, threads=2)])
    assert summary(cluster, Request(3, 1, numa=STRICT, threads=ThreadPolicy.ISOLATE)) == (
        "largest NUMA node on any host has 2 whole cores; "
        "asked for 3 with --numa strict --threads isolate")


def test_never_fits_hugepages() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=2, hugepages=((1048576, 4),))])
    assert summary(cluster, Request(1, 8192, numa=STRICT, hugepage_kib=1048576)) == (
        "largest NUMA node on any host has 4 GiB in 1 GiB hugepages; "
        "asked for 8 GiB with --numa strict")


def test_never_fits_nics_and_vendor() -> None:
    assert summary(two(), Request(1, 1, nics=2, numa=STRICT)) == (
        "largest NUMA node on any host has 1 NIC; asked for 2 with --numa strict")
    assert summary(two(), Request(1, 1, nics=1, nic_vendor="15b3")) == (
        "largest host has 0 NICs from vendor 0x15b3; asked for 1")


def test_never_fits_spanning() -> None:
    assert summary(two(), Request(5, 100, numa=ANY)) == "largest host has 4 cores; asked for 5"
    assert summary(two(), Request(1, 9000)) == (
        "largest host has 7.8 GiB of memory; asked for 8.8 GiB")


def test_never_fits_several_limits_at_once() -> None:
    assert summary(two(), Request(4, 65536, numa=STRICT)) == (
        "largest NUMA node on any host has 2 cores; asked for 4 with --numa strict; "
        "largest NUMA node on any host has 3.9 GiB of memory; asked for 64 GiB with --numa strict")


def test_never_fits_only_together() -> None:
    # a's nodes have the memory, b's the cores: no one node has both.
    cluster = Cluster([make_host("a", nodes=2, cores=1, memory_mib=1000),
                       make_host("b", nodes=2, cores=4, memory_mib=100)])
    assert summary(cluster, Request(2, 500, numa=STRICT)) == (
        "no single NUMA node on any host has 2 cores and 500 MiB of memory with --numa strict")


def test_unknown_host() -> None:
    got = two().place(Request(1, 1, host="x")).explanation
    assert got.never_fits and got.summary == "unknown host 'x'"


def test_pool_and_labels() -> None:
    assert summary(two(), Request(1, 1, pool="ci")) == "no host is in pool ci"
    assert summary(two(), Request(1, 1, labels=(("gpu", "a100"),))) == (
        "no host has label gpu=a100")


def test_pinned_host_too_small() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=2), make_host("b", nodes=1, cores=8)])
    assert summary(cluster, Request(4, 1, host="a", numa=STRICT)) == (
        "largest NUMA node on host a has 2 cores; asked for 4 with --numa strict")


def test_does_not_fit_now() -> None:
    cluster = two()
    cluster.reserve("j1", Allocation("a", (0, 1), 100, (NodeShare(0, (0, 1), 100),)))
    cluster.reserve("j2", Allocation("a", (2,), 100, (NodeShare(1, (2,), 100),)))
    cluster.set_state("b", HostState.CORDONED)
    got = cluster.explain(Request(2, 100, numa=STRICT))
    assert not got.fits and not got.never_fits
    assert got.summary == "no host has room now: a/node0: 0 free cores, needs 2; b: cordoned"
    assert [r.message for r in got.reasons] == [
        "a/node0: 0 free cores, needs 2", "a/node1: 1 free core, needs 2", "b: cordoned"]


def test_nic_in_use() -> None:
    cluster = Cluster([make_host("a", nodes=2, cores=2, nics_per_node=1)])
    alloc = cluster.place(Request(1, 100, nics=1, numa=STRICT)).allocation
    assert alloc is not None
    cluster.reserve("j", alloc)
    got = cluster.explain(Request(1, 100, nics=2, numa=ANY))
    assert got.summary == "no host has room now: a: NIC 0000:03:00.0 in use"


def test_summary_is_shortened_with_many_hosts() -> None:
    cluster = Cluster([make_host(f"h{i}", nodes=1, cores=2) for i in range(10)])
    for i in range(10):
        cluster.set_state(f"h{i}", HostState.DOWN)
    assert summary(cluster, Request(1, 1)) == (
        "no host has room now: h0: down; h1: down; h2: down; h3: down; and 6 more hosts")


def test_invalid_requests_never_fit() -> None:
    zero = two().explain(Request(0, 100))
    assert zero.never_fits and zero.summary == "a job needs at least 1 vCPU; asked for 0"
    odd = two().explain(Request(1, 1000, hugepage_kib=1048576))
    assert odd.summary == "1000 MiB is not a whole number of 1 GiB hugepages"


def test_fits_summary() -> None:
    assert two().place(Request(1, 100, numa=STRICT)).explanation.summary == "fits on b/node0"
    assert two().explain(Request(1, 100)).summary == "fits now: 2 hosts have room, e.g. a/node0"
    assert two().place(Request(3, 100, numa=ANY)).explanation.summary == "fits on b/node0+node1"


def test_invalid_memory_nics_and_page_size() -> None:
    assert summary(two(), Request(1, 0)) == "a job needs some memory; asked for 0 MiB"
    assert summary(two(), Request(1, 1, nics=-1)) == "asked for -1 NICs"
    assert summary(two(), Request(1, 1024, hugepage_kib=0)) == (
        "hugepage size must be positive; asked for 0 KiB")


def test_never_fits_nic_vendor_and_product() -> None:
    assert summary(two(), Request(1, 1, nics=1, nic_vendor="8086", nic_product="ffff")) == (
        "largest host has 0 NICs matching 8086:ffff; asked for 1")
    assert summary(two(), Request(1, 1, nics=1, nic_product="0xffff")) == (
        "largest host has 0 NICs with product 0xffff; asked for 1")


def test_never_fits_only_together_spanning() -> None:
    # a has the cores, b the memory: no host has both, whatever nodes it combines.
    cluster = Cluster([make_host("a", nodes=2, cores=4, memory_mib=100),
                       make_host("b", nodes=2, cores=1, memory_mib=8000)])
    assert summary(cluster, Request(4, 4000, numa=ANY)) == (
        "no host has 4 cores and 3.9 GiB of memory on NUMA nodes it can combine")


def test_free_cores_and_free_memory_on_different_nodes() -> None:
    cluster = Cluster([make_host("a", nodes=2, cores=2, memory_mib=1000)])
    # node0 keeps a core but no memory, node1 memory but no core.
    cluster.reserve("j0", Allocation("a", (0,), 1000, (NodeShare(0, (0,), 1000),)))
    cluster.reserve("j1", Allocation("a", (2, 3), 10, (NodeShare(1, (2, 3), 10),)))
    got = cluster.explain(Request(1, 100, numa=ANY))
    assert not got.fits and not got.never_fits
    assert got.summary == (
        "no host has room now: a: its free cores and free memory are on different NUMA nodes")
    assert got.reasons[-1].kind == "numa"


def test_pinned_host_outside_the_pool() -> None:
    assert summary(two(), Request(1, 1, host="a", pool="ci")) == "a: not in pool ci"


def test_nic_kept_by_its_iommu_group_names_the_group_and_the_job() -> None:
    host = make_host("a", nodes=1, cores=4, memory_mib=4096)
    cluster = Cluster([replace(host, devices=(Device("0000:02:00.0", 0, iommu_group=12),
                                              Device("0000:02:00.1", 0, iommu_group=12)))])
    cluster.reserve("x", Allocation("a", (0,), 100, (NodeShare(0, (0,), 100),),
                                    ("0000:02:00.0",)))
    assert summary(cluster, Request(1, 100, nics=1, numa=STRICT)) == (
        "no host has room now: a/node0: NIC 0000:02:00.0 in use; "
        "NIC 0000:02:00.1 shares IOMMU group 12 with a NIC held by job x")
