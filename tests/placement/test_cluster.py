"""Cluster: reserve / release / place / explain / free / copy / set_state."""

from __future__ import annotations

from dataclasses import replace

import pytest

from placement import (
    Cluster,
    Conflict,
    HostState,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
    UnknownHost,
    UnknownJob,
)
from placement.synthetic import make_host

STRICT = NumaPolicy.STRICT


def small() -> Cluster:
    return Cluster([make_host("a", nodes=2, cores=4, memory_mib=8192, nics_per_node=1),
                    make_host("b", nodes=2, cores=4, memory_mib=8192)])


def test_place_does_not_reserve() -> None:
    cluster = small()
    first = cluster.place(Request(cpus=2, memory_mib=1024))
    second = cluster.place(Request(cpus=2, memory_mib=1024))
    assert first.fits and first.allocation == second.allocation
    assert cluster.allocations() == {}


def test_reserve_then_release_round_trip() -> None:
    cluster = small()
    before = cluster.free("a")
    alloc = cluster.place(Request(cpus=3, memory_mib=2048, nics=1, numa=STRICT)).allocation
    assert alloc is not None
    cluster.reserve("j1", alloc, Request(cpus=3, memory_mib=2048))
    usage = cluster.free(alloc.host)
    assert usage.cpus_free == usage.cpus_total - 3
    assert usage.memory_free_mib == usage.memory_total_mib - 2048
    assert usage.nics_free == usage.nics_total - 1
    assert cluster.release("j1") == alloc
    assert cluster.free("a") == before


def test_reserve_twice_conflicts_with_readable_message() -> None:
    cluster = small()
    alloc = cluster.place(Request(cpus=2, memory_mib=1024)).allocation
    assert alloc is not None
    cluster.reserve("j1", alloc)
    assert alloc.host == "b"  # a's NICs are kept for jobs that need them
    with pytest.raises(Conflict, match=r"cpus 0, 1 on b are held by job j1"):
        cluster.reserve("j2", alloc)
    with pytest.raises(Conflict, match="already holds"):
        cluster.reserve("j1", alloc)


def test_reserve_rejects_what_does_not_exist() -> None:
    cluster = small()
    alloc = cluster.place(Request(cpus=1, memory_mib=1024, host="a")).allocation
    assert alloc is not None
    with pytest.raises(Conflict, match="unknown host 'zz'"):
        cluster.reserve("j", replace(alloc, host="zz"))
    bad_cpu = replace(alloc, cpus=(99,), nodes=(NodeShare(0, (99,), 1024),))
    with pytest.raises(Conflict, match="cpu 99 is not on a/node0"):
        cluster.reserve("j", bad_cpu)
    with pytest.raises(Conflict, match="NIC 0000:99:00.0 does not exist"):
        cluster.reserve("j", replace(alloc, devices=("0000:99:00.0",)))
    too_much = replace(alloc, memory_mib=9000, nodes=(NodeShare(0, alloc.cpus, 9000),))
    with pytest.raises(Conflict, match="8192 MiB free"):
        cluster.reserve("j", too_much)
    assert cluster.allocations() == {}
    assert cluster.free("a").cpus_free == 8


def test_reserve_is_all_or_nothing() -> None:
    cluster = small()
    alloc = cluster.place(Request(cpus=2, memory_mib=1024, host="a")).allocation
    assert alloc is not None
    broken = replace(alloc, devices=("0000:03:00.0", "0000:03:00.0"))
    with pytest.raises(Conflict, match="appears twice"):
        cluster.reserve("j", broken)
    assert cluster.free("a").cpus_free == 8
    cluster.reserve("j", alloc)


def test_reserved_host_cpus_are_never_handed_out_nor_counted() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=4, reserved_cpus=frozenset({0, 1}))])
    assert cluster.free("a").cpus_total == 2
    alloc = cluster.place(Request(cpus=2, memory_mib=100)).allocation
    assert alloc is not None and set(alloc.cpus) == {2, 3}
    assert not cluster.place(Request(cpus=3, memory_mib=100)).fits


def test_release_unknown_job() -> None:
    with pytest.raises(UnknownJob, match="job 'nope' holds nothing"):
        small().release("nope")


def test_free_unknown_host() -> None:
    with pytest.raises(UnknownHost, match="unknown host 'zz'"):
        small().free("zz")


def test_copy_is_independent() -> None:
    cluster = small()
    alloc = cluster.place(Request(cpus=2, memory_mib=1024)).allocation
    assert alloc is not None
    snapshot = cluster.copy()
    cluster.reserve("j1", alloc)
    assert snapshot.allocations() == {}
    snapshot.reserve("j9", alloc)
    snapshot.set_state("b", HostState.DOWN)
    assert set(cluster.allocations()) == {"j1"}
    assert cluster.hosts["b"].state == HostState.UP


def test_cordoned_host_takes_nothing_new_but_keeps_its_jobs() -> None:
    cluster = small()
    alloc = cluster.place(Request(cpus=2, memory_mib=1024, host="b")).allocation
    assert alloc is not None
    cluster.set_state("b", HostState.CORDONED)
    cluster.reserve("j1", alloc)  # a job already running there is re-recorded after a restart
    decision = cluster.place(Request(cpus=1, memory_mib=1, host="b"))
    assert not decision.fits
    assert decision.explanation.summary == "host b has no room now: b: cordoned"
    cluster.set_state("b", HostState.UP)
    assert cluster.place(Request(cpus=1, memory_mib=1, host="b")).fits


def test_isolate_keeps_siblings_idle() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=4, threads=2)])
    alloc = cluster.place(Request(cpus=2, memory_mib=10,
                                  threads=ThreadPolicy.ISOLATE)).allocation
    assert alloc is not None
    assert alloc.cpus == (0, 1) and alloc.idle_cpus == (4, 5)
    cluster.reserve("j", alloc)
    assert cluster.free("a").cpus_free == 4


def test_dedicated_fills_whole_cores_first() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=4, threads=2)])
    alloc = cluster.place(Request(cpus=3, memory_mib=10)).allocation
    assert alloc is not None
    assert alloc.cpus == (0, 4, 1)
    cluster.reserve("j", alloc)
    # The next single vCPU goes into the half-used core, not a whole one.
    nxt = cluster.place(Request(cpus=1, memory_mib=10)).allocation
    assert nxt is not None and nxt.cpus == (5,)


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        small().place(Request(cpus=1, memory_mib=1), policy="best")
