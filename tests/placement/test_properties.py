"""Properties over random clusters and random place / release sequences."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings

from placement import Allocation, Cluster, Host, HostState, NumaPolicy, Request, ThreadPolicy
from placement.ledger import copy_ledger, pages_for
from tests.placement.strategies import hosts, operations, requests

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def assert_nothing_double_booked(cluster: Cluster, built: list[Host]) -> None:
    by_name = {h.name: h for h in built}
    cpus: Counter[tuple[str, int]] = Counter()
    devices: Counter[tuple[str, str]] = Counter()
    memory: Counter[tuple[str, int]] = Counter()
    pages: Counter[tuple[str, int]] = Counter()
    for alloc in cluster.allocations().values():
        host = by_name[alloc.host]
        cpus.update((alloc.host, c) for c in (*alloc.cpus, *alloc.idle_cpus))
        devices.update((alloc.host, d) for d in alloc.devices)
        assert not set(alloc.cpus) & host.reserved_cpus
        assert sum(s.memory_mib for s in alloc.nodes) == alloc.memory_mib
        for share in alloc.nodes:
            node_cpus = {c.id for n in host.nodes if n.id == share.node for c in n.cpus}
            assert set(share.cpus) <= node_cpus
            assert share.cpus and share.memory_mib > 0
            if alloc.hugepage_kib:
                pages[(alloc.host, share.node)] += pages_for(share.memory_mib, alloc.hugepage_kib)
            else:
                memory[(alloc.host, share.node)] += share.memory_mib
    assert max(cpus.values(), default=0) <= 1, "a cpu is held twice"
    assert max(devices.values(), default=0) <= 1, "a NIC is held twice"
    for host in built:
        usage = cluster.free(host.name)
        for node, node_usage in zip(host.nodes, usage.nodes, strict=True):
            assert memory[(host.name, node.id)] <= node.memory_mib
            assert node_usage.memory_free_mib == node.memory_mib - memory[(host.name, node.id)]
            for size, count in node.hugepages:
                assert pages[(host.name, node.id)] <= count
                assert dict(node_usage.hugepages_free)[size] == count - pages[(host.name, node.id)]
            held = sum(1 for (h, c) in cpus if h == host.name and c in
                       {cpu.id for cpu in node.cpus})
            assert node_usage.cpus_free == node_usage.cpus_total - held


def assert_request_honoured(alloc: Allocation, request: Request, built: list[Host],
                            cluster: Cluster) -> None:
    host = next(h for h in built if h.name == alloc.host)
    assert len(alloc.cpus) == request.cpus and alloc.memory_mib == request.memory_mib
    assert len(alloc.devices) == request.nics
    node_of_device = {d.address: d.node for d in host.devices}
    if request.numa == NumaPolicy.STRICT:
        assert len(alloc.nodes) == 1, "strict spans nodes"
        assert all(node_of_device[d] == alloc.nodes[0].node for d in alloc.devices)
    if request.threads == ThreadPolicy.ISOLATE:
        siblings = {c.id: c.siblings for n in host.nodes for c in n.cpus}
        idle = set(alloc.idle_cpus)
        for cpu in alloc.cpus:
            assert siblings[cpu] - {cpu} <= idle
            assert not siblings[cpu] & host.reserved_cpus
    if request.host is not None:
        assert alloc.host == request.host
    assert host.state == HostState.UP
    if request.pool is not None:
        assert request.pool in host.pools


def assert_isolation_respected(cluster: Cluster, built: list[Host]) -> None:
    """No job's cpu is a sibling of a cpu an isolated job uses."""
    for job, alloc in cluster.allocations().items():
        if not alloc.idle_cpus:
            continue
        host = next(h for h in built if h.name == alloc.host)
        siblings = {c.id: c.siblings for n in host.nodes for c in n.cpus}
        fenced = {s for c in alloc.cpus for s in siblings[c]}
        for other, theirs in cluster.allocations().items():
            if other != job and theirs.host == alloc.host:
                assert not fenced & set(theirs.cpus) | fenced & set(theirs.idle_cpus)


def _state(cluster: Cluster) -> tuple[object, ...]:
    # The whole internal state, to show release restores it exactly (not just the totals).
    return ([copy_ledger(led) for led in cluster._ledgers], dict(cluster._allocs),
            list(cluster._by_node._key), list(cluster._by_host._key))


@SETTINGS
@given(built=hosts(), ops=operations)
def test_random_sequences_keep_every_invariant(built: list[Host], ops: list) -> None:
    cluster = Cluster(built)
    empty = Cluster([replace(h, state=HostState.UP) for h in built])
    held: list[str] = []
    for n, (kind, arg, policy) in enumerate(ops):
        if kind == "release":
            if held:
                cluster.release(held.pop(arg % len(held)))
            continue
        request: Request = arg
        decision = cluster.place(request, policy)
        explanation = cluster.explain(request)
        assert explanation.fits == decision.fits == decision.explanation.fits
        assert cluster.ever_fits(request) == (not explanation.never_fits)
        if not decision.fits:
            assert decision.explanation == explanation
            assert explanation.summary and "\n" not in explanation.summary
            # never_fits means exactly: not even on the empty cluster with every host up.
            assert explanation.never_fits == (not empty.place(request).fits)
            continue
        alloc = decision.allocation
        assert alloc is not None
        assert_request_honoured(alloc, request, built, cluster)
        before = _state(cluster)
        cluster.reserve(f"j{n}", alloc, request)
        cluster.release(f"j{n}")
        assert _state(cluster) == before, "release did not restore the prior state"
        cluster.reserve(f"j{n}", alloc, request)
        held.append(f"j{n}")
        assert_nothing_double_booked(cluster, built)
        assert_isolation_respected(cluster, built)
    for job in list(held):
        cluster.release(job)
    assert all(cluster.free(h.name).cpus_free == cluster.free(h.name).cpus_total for h in built)


@SETTINGS
@given(built=hosts(), request=requests())
def test_anti_affinity_members_land_on_distinct_hosts(built: list[Host], request: Request) -> None:
    cluster = Cluster(built)
    member = replace(request, anti_affinity="gang", host=None)
    hosts_used = []
    for i in range(4):
        decision = cluster.place(member)
        if not decision.fits:
            break
        assert decision.allocation is not None
        cluster.reserve(f"m{i}", decision.allocation, member)
        hosts_used.append(decision.allocation.host)
    assert len(hosts_used) == len(set(hosts_used))


@SETTINGS
@given(built=hosts(), request=requests())
def test_placement_is_deterministic(built: list[Host], request: Request) -> None:
    assert Cluster(built).place(request) == Cluster(built).place(request)
