"""Each filter on its own: it passes what it should and words its rejection readably."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from placement import (
    Allocation,
    Device,
    HostState,
    Node,
    NodeShare,
    NumaPolicy,
    Reason,
    Request,
    ThreadPolicy,
)
from placement import filters as f
from placement.fit import fit_host, split
from placement.ledger import HostLedger, claim, empty_ledger
from placement.need import need_of
from placement.synthetic import make_host


def ledger(**shape: Any) -> HostLedger:
    base: dict[str, Any] = {"nodes": 2, "cores": 4, "memory_mib": 4096, "nics_per_node": 1}
    base.update(shape)
    return empty_ledger(make_host("a", **base))


def messages(reasons: tuple[Reason, ...]) -> list[str]:
    return [r.message for r in reasons]


def test_host_name() -> None:
    led = ledger()
    assert f.host_name(led, Request(1, 1)) == ()
    assert f.host_name(led, Request(1, 1, host="a")) == ()
    assert messages(f.host_name(led, Request(1, 1, host="b"))) == ["a: not host b"]


def test_host_state() -> None:
    led = ledger()
    assert f.host_state(led, Request(1, 1)) == ()
    led.host = replace(led.host, state=HostState.CORDONED)
    assert messages(f.host_state(led, Request(1, 1))) == ["a: cordoned"]
    led.host = replace(led.host, state=HostState.DOWN)
    assert f.host_state(led, Request(1, 1))[0].kind == "state"


def test_pool() -> None:
    led = ledger(pools=("batch", "lab"))
    assert f.pool(led, Request(1, 1)) == ()
    assert f.pool(led, Request(1, 1, pool="batch")) == ()
    assert f.pool(led, Request(1, 1, pool="lab")) == ()  # counted in each of its pools
    assert messages(f.pool(led, Request(1, 1, pool="ci"))) == ["a: not in pool ci"]


def test_labels() -> None:
    led = ledger(labels=(("rack", "r1"), ("nic", "x710")))
    assert f.labels(led, Request(1, 1, labels=(("rack", "r1"),))) == ()
    got = f.labels(led, Request(1, 1, labels=(("rack", "r2"), ("ssd", "yes"))))
    assert messages(got) == ["a: lacks label rack=r2, ssd=yes"]


def test_anti_affinity() -> None:
    led = ledger()
    assert f.anti_affinity(led, Request(1, 1, anti_affinity="g")) == ()
    alloc = Allocation("a", (0,), 10, (NodeShare(0, (0,), 10),))
    claim(led, alloc, "j1", +1, group="g")
    got = f.anti_affinity(led, Request(1, 1, anti_affinity="g"))
    assert messages(got) == ["a: already runs a member of group g"]
    assert f.anti_affinity(led, Request(1, 1, anti_affinity="other")) == ()
    claim(led, alloc, "j1", -1, group="g")
    assert f.anti_affinity(led, Request(1, 1, anti_affinity="g")) == ()


def test_node_cpus_dedicated_and_isolate() -> None:
    led = ledger(threads=2)
    node = led.nodes[0]
    assert f.node_cpus(led, node, need_of(Request(8, 1))) == ()
    assert messages(f.node_cpus(led, node, need_of(Request(9, 1)))) == [
        "a/node0: 8 free cores, needs 9"]
    isolate = need_of(Request(5, 1, threads=ThreadPolicy.ISOLATE))
    assert messages(f.node_cpus(led, node, isolate)) == ["a/node0: 4 free whole cores, needs 5"]


def test_node_memory_and_hugepages() -> None:
    led = ledger(hugepages=((2048, 100),))
    node = led.nodes[0]
    assert f.node_memory(led, node, need_of(Request(1, 4096))) == ()
    assert messages(f.node_memory(led, node, need_of(Request(1, 8000)))) == [
        "a/node0: 4 GiB free memory, needs 7.8 GiB"]
    huge = need_of(Request(1, 400, hugepage_kib=2048))
    assert messages(f.node_memory(led, node, huge)) == [
        "a/node0: 100 free 2 MiB hugepages, needs 200"]
    gig = need_of(Request(1, 1024, hugepage_kib=1048576))
    assert messages(f.node_memory(led, node, gig)) == ["a/node0: no 1 GiB hugepages"]
    assert f.node_memory(led, node, gig)[0].kind == "hugepages"


def test_node_nics_missing_in_use_and_vendor() -> None:
    led = ledger(nics_per_node=2)
    node = led.nodes[1]
    assert f.node_nics(led, node, need_of(Request(1, 1, nics=2))) == ()
    assert messages(f.node_nics(led, node, need_of(Request(1, 1, nics=3)))) == [
        "a/node1: 2 NICs, needs 3"]
    claim(led, Allocation("a", (4,), 1, (NodeShare(1, (4,), 1),), ("0000:04:00.0",)), "j", +1)
    assert messages(f.node_nics(led, node, need_of(Request(1, 1, nics=2)))) == [
        "a/node1: NIC 0000:04:00.0 in use"]
    mellanox = need_of(Request(1, 1, nics=1, nic_vendor="0x15b3"))
    assert messages(f.node_nics(led, node, mellanox)) == [
        "a/node1: no NICs from vendor 0x15b3, needs 1"]
    intel = need_of(Request(1, 1, nics=1, nic_vendor="8086", nic_product="0x1572"))
    assert f.node_nics(led, node, intel) == ()


def test_span_filters_sum_the_nodes() -> None:
    led = ledger()
    assert f.span_cpus(led, need_of(Request(8, 1))) == ()
    assert messages(f.span_cpus(led, need_of(Request(9, 1)))) == ["a: 8 free cores, needs 9"]
    assert messages(f.span_memory(led, need_of(Request(1, 9000)))) == [
        "a: 8 GiB free memory, needs 8.8 GiB"]
    assert messages(f.span_nics(led, need_of(Request(1, 1, nics=3)))) == ["a: 2 NICs, needs 3"]


def test_fit_modes() -> None:
    led = ledger()
    six = need_of(Request(6, 100))
    assert not fit_host(led, six, "node").fits
    spanning = fit_host(led, six, "either")
    assert spanning.fits and len(spanning.options[0].shares) == 2
    four = fit_host(led, need_of(Request(4, 100)), "either")
    assert [o.shares for o in four.options] == [((0, 4, 100),), ((1, 4, 100),)]


def test_split_gives_every_node_a_cpu_and_memory() -> None:
    assert split(6, 1000, [(0, 4, 800), (1, 4, 800)]) == ((0, 4, 667), (1, 2, 333))
    # A node with cpus but no memory cannot be a guest NUMA cell.
    assert split(6, 100, [(0, 4, 0), (1, 4, 800)]) is None
    assert split(2, 1000, [(0, 1, 300), (1, 1, 700)]) == ((0, 1, 300), (1, 1, 700))
    assert split(1, 1000, [(0, 1, 500), (1, 1, 600)]) is None


# --- hardware that real hosts have: distances, memory-only nodes, SMT data -----------------

# POWER8-like distances: nodes 0/1 on one chip and 16/17 on the other, 20 within, 40 across.
POWER8 = {(0, 1): 20, (16, 17): 20}


def power8_distance(a: int, b: int) -> int:
    return 10 if a == b else POWER8.get((min(a, b), max(a, b)), 40)


def test_split_takes_the_nearest_pair_with_room() -> None:
    free = [(0, 6, 800), (1, 2, 800), (16, 6, 800), (17, 6, 800)]
    # Without distances: the two nodes with most free cpus, 0 and 16 (distance 40).
    assert split(10, 1000, free) == ((0, 6, 600), (16, 4, 400))
    # With them: 16+17 (distance 20). From 0, its neighbour 1 has 2 cpus: 3 nodes needed.
    assert split(10, 1000, free, power8_distance) == ((16, 6, 600), (17, 4, 400))


def test_split_with_distances_still_prefers_fewer_nodes() -> None:
    # 0+1 is near but short (8 cpus); one node further away (16) is enough with 0: 12 cpus.
    free = [(0, 6, 800), (1, 2, 800), (16, 6, 800)]
    assert split(12, 1200, free, power8_distance) == ((0, 6, 600), (16, 6, 600))


def test_split_memory_only_nodes_supply_what_the_cpus_nodes_lack() -> None:
    # 2 vCPUs and 6000 MiB; node 0 has the cpus and 4000 MiB, node 2 is memory-only.
    assert split(2, 6000, [(0, 4, 4000)], None, [(2, 16000)]) == ((0, 2, 4000), (2, 0, 2000))
    # The nearest memory-only node first: node 3 is 20 from node 0, node 2 is 40.
    def distance(a: int, b: int) -> int:
        return {(0, 2): 40, (0, 3): 20}.get((min(a, b), max(a, b)), 10)
    assert split(2, 6000, [(0, 4, 4000)], distance, [(2, 16000), (3, 1000)]) == (
        (0, 2, 4000), (2, 0, 1000), (3, 0, 1000))
    # Not enough even with them.
    assert split(2, 30000, [(0, 4, 4000)], None, [(2, 16000)]) is None


def test_units_of_a_memory_only_node_count_only_when_asked() -> None:
    host = make_host("a", nodes=1, cores=4, memory_mib=4096)
    cxl = Node(id=1, cpus=(), memory_mib=16384)
    led = empty_ledger(replace(host, nodes=(*host.nodes, cxl)))
    node = led.node(1)
    assert node is not None
    assert f.units(node, need_of(Request(1, 100))) == 0
    assert f.units(node, need_of(Request(1, 100, mem_nodes=True))) == 16384


def test_threads_filter_refuses_isolate_without_sibling_data() -> None:
    led = ledger()
    assert f.threads(led, Request(1, 1, threads=ThreadPolicy.ISOLATE)) == ()
    led.host = replace(led.host, siblings_known=False)
    assert f.threads(led, Request(1, 1)) == ()
    (reason,) = f.threads(led, Request(1, 1, threads=ThreadPolicy.ISOLATE))
    assert reason.kind == "threads"
    assert reason.message == ("a: libvirt reports no SMT sibling data, so --threads isolate "
                              "cannot keep siblings idle")


def test_mem_nodes_with_strict_is_a_request_problem() -> None:
    need = need_of(Request(1, 100, numa=NumaPolicy.STRICT, mem_nodes=True))
    assert need.problem is not None and "--numa prefer or any" in need.problem


# --- NICs that cannot be split between jobs: IOMMU groups, SR-IOV ---------------------------


def nic_host(*devices: Device) -> HostLedger:
    return empty_ledger(replace(make_host("a", nodes=1, cores=4, memory_mib=4096),
                                devices=devices))


def test_free_nics_never_pairs_a_pf_with_its_vf() -> None:
    pf = Device("0000:3b:00.0", 0, vfs=("0000:3b:02.0", "0000:3b:02.1"))
    vf0 = Device("0000:3b:02.0", 0, pf="0000:3b:00.0")
    vf1 = Device("0000:3b:02.1", 0, pf="0000:3b:00.0")
    led = nic_host(pf, vf0, vf1)
    node = led.nodes[0]
    # VFs are kept before their PF: two VFs together, never the PF with one of them.
    assert f.free_nics(led, node, need_of(Request(1, 1, nics=3))) == [vf0.address, vf1.address]


def test_split_with_distances_never_uses_more_nodes_than_without() -> None:
    # 1 is 20 from 0 and from 2, which are 40 apart. Grown from any node, the nearest-first
    # set is 0+1+2; dropping 1 (not needed) leaves 0+2, the 2 nodes the fullest-first order
    # takes too.
    def distance(a: int, b: int) -> int:
        return 10 if a == b else 40 if {a, b} == {0, 2} else 20

    free = [(0, 6, 600), (1, 1, 600), (2, 6, 600)]
    assert split(12, 1200, free) == ((0, 6, 600), (2, 6, 600))
    assert split(12, 1200, free, distance) == ((0, 6, 600), (2, 6, 600))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 800)), min_size=1, max_size=6),
       st.integers(1, 24), st.integers(1, 3000), st.lists(st.integers(11, 40), min_size=15,
                                                         max_size=15))
def test_split_with_distances_is_valid_and_no_wider(free: list[tuple[int, int]], cpus: int,
                                                    memory: int, table: list[int]) -> None:
    nodes = [(i, c, m) for i, (c, m) in enumerate(free)]
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    far = dict(zip(pairs, table, strict=True))

    def distance(a: int, b: int) -> int:
        return 10 if a == b else far[(min(a, b), max(a, b))]

    plain = split(cpus, memory, nodes)
    near = split(cpus, memory, nodes, distance)
    if plain is not None:
        assert near is not None and len(near) <= len(plain)
    if near is None:
        return
    assert sum(s[1] for s in near) == cpus and sum(s[2] for s in near) == memory
    by_id = {n[0]: n for n in nodes}
    for node, given_cpus, given_mem in near:
        assert 1 <= given_cpus <= by_id[node][1] and 1 <= given_mem <= by_id[node][2]
