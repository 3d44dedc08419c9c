"""Cluster: reserve / release / place / explain / free / copy / set_state."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement import (
    Allocation,
    Cluster,
    Conflict,
    Device,
    HostState,
    Node,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
    UnknownHost,
    UnknownJob,
)
from placement.synthetic import make_host
from tests.placement.strategies import hosts, requests

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


# --- NICs bound together: IOMMU groups and SR-IOV ------------------------------------------

FN0, FN1, OTHER = "0000:02:00.0", "0000:02:00.1", "0000:03:00.0"


def grouped() -> Cluster:
    """One node; two functions of one NIC share IOMMU group 12, a third NIC is alone in 13."""
    host = make_host("a", nodes=1, cores=4, memory_mib=4096)
    return Cluster([replace(host, devices=(
        Device(FN0, 0, iommu_group=12), Device(FN1, 0, iommu_group=12),
        Device(OTHER, 0, iommu_group=13)))])


def test_iommu_group_goes_to_one_job_only() -> None:
    cluster = grouped()
    first = cluster.place(Request(1, 100, nics=1)).allocation
    assert first is not None and first.devices == (FN0,)
    cluster.reserve("x", first)
    # 02:00.1 is free by itself but its group is held: the next job gets the lone NIC.
    second = cluster.place(Request(1, 100, nics=1)).allocation
    assert second is not None and second.devices == (OTHER,)
    cluster.reserve("y", second)
    assert cluster.free("a").nics_free == 0
    assert not cluster.place(Request(1, 100, nics=1)).fits
    cluster.release("x")
    assert cluster.free("a").nics_free == 2


def test_iommu_group_mate_cannot_be_reserved_by_another_job() -> None:
    cluster = grouped()
    cluster.reserve("x", Allocation("a", (0,), 100, (NodeShare(0, (0,), 100),), (FN0,)))
    with pytest.raises(Conflict, match="NIC 0000:02:00.1 on a shares IOMMU group 12 with a NIC "
                                       "held by job x"):
        cluster.reserve("y", Allocation("a", (1,), 100, (NodeShare(0, (1,), 100),), (FN1,)))


def test_one_job_may_hold_a_whole_iommu_group() -> None:
    cluster = grouped()
    alloc = cluster.place(Request(1, 100, nics=2)).allocation
    assert alloc is not None and alloc.devices == (FN0, FN1)
    cluster.reserve("x", alloc)
    cluster.release("x")
    assert cluster.free("a").nics_free == 3


PF, VF0, VF1 = "0000:3b:00.0", "0000:3b:02.0", "0000:3b:02.1"


def sriov() -> Cluster:
    host = make_host("a", nodes=1, cores=4, memory_mib=4096)
    return Cluster([replace(host, devices=(
        Device(PF, 0, vfs=(VF0, VF1)), Device(VF0, 0, pf=PF), Device(VF1, 0, pf=PF)))])


def test_a_held_vf_keeps_its_pf_from_jobs_and_the_reverse() -> None:
    cluster = sriov()
    vf_job = Allocation("a", (0,), 100, (NodeShare(0, (0,), 100),), (VF0,))
    pf_job = Allocation("a", (1,), 100, (NodeShare(0, (1,), 100),), (PF,))
    cluster.reserve("v", vf_job)
    assert cluster.free("a").nics_free == 1  # VF1 only
    with pytest.raises(Conflict, match=f"NIC {PF} on a has VF {VF0} held by job v"):
        cluster.reserve("p", pf_job)
    cluster.release("v")
    cluster.reserve("p", pf_job)
    assert cluster.free("a").nics_free == 0
    with pytest.raises(Conflict, match=f"NIC {VF0} on a is a VF of {PF}, held by job p"):
        cluster.reserve("v", vf_job)


def test_a_pf_and_its_vf_never_go_to_one_job() -> None:
    cluster = sriov()
    both = Allocation("a", (0,), 100, (NodeShare(0, (0,), 100),), (PF, VF0))
    with pytest.raises(Conflict, match="are an SR-IOV PF and its VF"):
        cluster.reserve("x", both)
    alloc = cluster.place(Request(1, 100, nics=2)).allocation
    assert alloc is not None and alloc.devices == (VF0, VF1)
    assert not cluster.place(Request(1, 100, nics=3)).fits


# --- memory-only nodes, distances, missing SMT data ------------------------------------------


def with_cxl() -> Cluster:
    """Nodes 0 and 1: 4 cpus, 4096 MiB each; node 2: 16384 MiB and no cpus (CXL memory)."""
    host = make_host("a", nodes=2, cores=4, memory_mib=4096)
    return Cluster([replace(host, nodes=(*host.nodes, Node(2, (), 16384)))])


def test_memory_only_node_is_never_used_silently() -> None:
    cluster = with_cxl()
    alloc = cluster.place(Request(2, 6144, numa=NumaPolicy.ANY)).allocation
    assert alloc is not None
    assert [(s.node, len(s.cpus), s.memory_mib) for s in alloc.nodes] == [(0, 1, 3072),
                                                                          (1, 1, 3072)]
    # 8192 MiB of ordinary memory next to cpus: 20000 MiB never fits without asking.
    explanation = cluster.explain(Request(2, 20000, numa=NumaPolicy.ANY))
    assert explanation.never_fits
    assert explanation.summary == "largest host has 8 GiB of memory; asked for 19.5 GiB"


def test_memory_only_node_serves_a_job_that_asks() -> None:
    cluster = with_cxl()
    alloc = cluster.place(Request(2, 20000, numa=NumaPolicy.ANY, mem_nodes=True)).allocation
    assert alloc is not None
    # node 0's 4096 MiB first, the 15904 MiB it lacks from node 2, which gets no vCPU
    assert [(s.node, s.cpus, s.memory_mib) for s in alloc.nodes] == [(0, (0, 1), 4096),
                                                                     (2, (), 15904)]
    cluster.reserve("x", alloc)
    assert cluster.free("a").nodes[2].memory_free_mib == 16384 - 15904
    cluster.release("x")
    assert cluster.free("a").nodes[2].memory_free_mib == 16384


def power8() -> Cluster:
    """Nodes 0, 1, 16, 17 of 8 single-thread cores; 20 within a chip (0-1, 16-17), 40 across."""
    ids = (0, 1, 16, 17)

    def distance(a: int, b: int) -> int:
        return 10 if a == b else 20 if {a, b} in ({0, 1}, {16, 17}) else 40

    base = make_host("p8", nodes=4, cores=8, memory_mib=8192)
    nodes = tuple(
        Node(ids[i], n.cpus, n.memory_mib, distances=tuple((o, distance(ids[i], o)) for o in ids))
        for i, n in enumerate(base.nodes))
    return Cluster([replace(base, nodes=nodes)])


def test_a_span_takes_the_nearest_nodes_with_room() -> None:
    cluster = power8()
    # cpus 0-7 node 0, 8-15 node 1, 16-23 node 16, 24-31 node 17. Leave 6, 2, 6, 6 free.
    cluster.reserve("busy", Allocation("p8", (0, 1, 8, 9, 10, 11, 12, 13, 16, 17, 24, 25), 400, (
        NodeShare(0, (0, 1), 100), NodeShare(1, (8, 9, 10, 11, 12, 13), 100),
        NodeShare(16, (16, 17), 100), NodeShare(17, (24, 25), 100))))
    alloc = cluster.place(Request(10, 1000, numa=NumaPolicy.ANY)).allocation
    assert alloc is not None
    # Not 0+16 (distance 40, the two fullest-free first): 16+17 at distance 20.
    assert [(s.node, s.cpus, s.memory_mib) for s in alloc.nodes] == [
        (16, (18, 19, 20, 21, 22, 23), 600), (17, (26, 27, 28, 29), 400)]


def test_isolate_is_refused_on_a_host_without_sibling_data() -> None:
    cluster = Cluster([replace(make_host("a", nodes=1, cores=4, memory_mib=4096),
                               siblings_known=False)])
    assert cluster.place(Request(1, 100)).fits
    explanation = cluster.explain(Request(1, 100, threads=ThreadPolicy.ISOLATE))
    assert explanation.never_fits
    assert explanation.summary == ("no host matches: a: libvirt reports no SMT sibling data, "
                                   "so --threads isolate cannot keep siblings idle")


def bound_nics() -> Cluster:
    """Two nodes; node 0: a 2-function group and a lone NIC; node 1: a PF with two VFs."""
    host = make_host("a", nodes=2, cores=4, memory_mib=4096)
    return Cluster([replace(host, devices=(
        Device(FN0, 0, iommu_group=12), Device(FN1, 0, iommu_group=12),
        Device(OTHER, 0, iommu_group=13),
        Device(PF, 1, iommu_group=40, vfs=(VF0, VF1)), Device(VF0, 1, iommu_group=41, pf=PF),
        Device(VF1, 1, iommu_group=42, pf=PF)))])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from(list(NumaPolicy))),
                max_size=25))
def test_bound_nics_are_never_split_between_jobs(steps: list[tuple[bool, int, NumaPolicy]]
                                                 ) -> None:
    cluster = bound_nics()
    devices = {d.address: d for d in cluster.hosts["a"].devices}

    def partners(a: str, b: str) -> bool:
        x, y = devices[a], devices[b]
        return (x.iommu_group == y.iommu_group) or x.pf == b or y.pf == a

    for n, (add, nics, numa) in enumerate(steps):
        held = cluster.allocations()
        if add or not held:
            request = Request(1, 100, nics=nics, numa=numa)
            decision = cluster.place(request)
            assert decision.fits == cluster.explain(request).fits
            if decision.allocation is not None:
                cluster.reserve(f"j{n}", decision.allocation, request)
        else:
            cluster.release(sorted(held)[0])
        holder = {d: job for job, alloc in cluster.allocations().items() for d in alloc.devices}
        for a, job in holder.items():
            for b, other in holder.items():
                if a != b and partners(a, b):
                    assert job == other, f"{a} ({job}) and {b} ({other}) are bound"
                if a != b and (devices[a].pf == b):
                    assert job != other, f"{a} and its PF {b} in one job"
        # free = held by nobody and no partner held (by anybody)
        free = {u.address for node in cluster.free("a").nodes for u in node.nics
                if u.holder is None and not u.blocked}
        expected = {a for a in devices if a not in holder
                    and not any(partners(a, b) for b in holder if b != a)}
        assert free == expected
        assert cluster.free("a").nics_free == len(expected)
    for job in list(cluster.allocations()):
        cluster.release(job)
    assert cluster.free("a").nics_free == 6


def test_a_span_takes_nics_from_the_nearest_other_node() -> None:
    """Nodes 0-3 of 4 cpus; 3 is 20 from 0 and 1, 2 is 30 from them. The job spans 0+1 (2 and 3
    are full); its NIC comes from node 3, not from node 2 whose address sorts first."""
    far = {frozenset({0, 2}): 30, frozenset({1, 2}): 30, frozenset({2, 3}): 30}

    def distance(a: int, b: int) -> int:
        return 10 if a == b else far.get(frozenset({a, b}), 20)

    base = make_host("a", nodes=4, cores=4, memory_mib=4096)
    nodes = tuple(replace(n, distances=tuple((o, distance(n.id, o)) for o in range(4)))
                  for n in base.nodes)
    cluster = Cluster([replace(base, nodes=nodes, devices=(
        Device("0000:02:00.0", 2), Device("0000:03:00.0", 3)))])
    full = tuple(range(8, 16))
    cluster.reserve("busy", Allocation("a", full, 200, (NodeShare(2, full[:4], 100),
                                                        NodeShare(3, full[4:], 100))))
    alloc = cluster.place(Request(6, 600, nics=1, numa=NumaPolicy.ANY)).allocation
    assert alloc is not None
    assert [s.node for s in alloc.nodes] == [0, 1]
    assert alloc.devices == ("0000:03:00.0",)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["reserve", "release", "copy",
                                                               "state"]),
                          st.integers(0, 7)), max_size=40))
def test_copies_share_nothing_they_change(ops: list[tuple[int, str, int]]) -> None:
    """Copy-on-write: after any mix of changes to a cluster, its copies and theirs, each one
    reads exactly like a cluster built afresh by replaying only its own history."""
    hosts = [make_host(n, nodes=2, cores=4) for n in ("a", "b")]
    clusters = [Cluster(hosts)]
    histories: list[list[tuple[str, Any]]] = [[]]
    for which, op, n in ops:
        k = which % len(clusters)
        cluster, history = clusters[k], histories[k]
        job = f"j{n}"
        if op == "copy":
            clusters.append(cluster.copy())
            histories.append(list(history))
        elif op == "reserve" and job not in cluster.allocations():
            decision = cluster.place(Request(cpus=1 + n % 3, memory_mib=512))
            if decision.allocation is not None:
                cluster.reserve(job, decision.allocation)
                history.append(("reserve", (job, decision.allocation)))
        elif op == "release" and job in cluster.allocations():
            cluster.release(job)
            history.append(("release", job))
        elif op == "state":
            cluster.set_state("ab"[n % 2], [HostState.UP, HostState.CORDONED][n // 4 % 2])
            history.append(("state", ("ab"[n % 2], n // 4 % 2)))
    for cluster, history in zip(clusters, histories, strict=True):
        fresh = Cluster(hosts)
        for op, arg in history:
            if op == "reserve":
                fresh.reserve(*arg)
            elif op == "release":
                fresh.release(arg)
            else:
                fresh.set_state(arg[0], [HostState.UP, HostState.CORDONED][arg[1]])
        assert fresh.allocations() == cluster.allocations()
        for name in ("a", "b"):
            assert cluster.free(name) == fresh.free(name)


@given(hosts(), requests())
def test_candidates_are_the_hosts_the_static_filters_admit(
        given_hosts: list[Any], request: Request) -> None:
    """`Cluster.candidates` (its shortcut for unconstrained requests included) is exactly
    the hosts passing the static host filters, whatever they hold and their state."""
    from placement.filters import STATIC_HOST_FILTERS
    from placement.ledger import empty_ledger

    cluster = Cluster(given_hosts)
    expected = tuple(h.name for h in given_hosts
                     if not any(f(empty_ledger(h), request) for f in STATIC_HOST_FILTERS))
    assert cluster.candidates(request) == expected
    assert cluster.pools == tuple(sorted({p for h in given_hosts for p in h.pools}))
