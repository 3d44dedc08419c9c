"""The daemon's lending model, pure (placement/lending.py, docs/borrowing.md "In the daemon"):
which cores are lendable, the lendable view, where a borrower goes, when and how it gives
cores back."""

from __future__ import annotations

from placement import Allocation, Cluster, NodeShare, NumaPolicy, Request
from placement.lending import (
    Loan,
    give_back,
    lendable_cpus,
    lendable_view,
    move_for_give_back,
    place_borrower,
    without_cpus,
)
from placement.plans import Checkpoint, Migrate, Repin
from placement.synthetic import make_host

STRICT = NumaPolicy.STRICT


def _alloc(host: str, node: int, cpus: tuple[int, ...], memory: int) -> Allocation:
    return Allocation(host, cpus, memory, (NodeShare(node, cpus, memory),))


def _owner_cluster(hosts: str = "a", cores: int = 2, memory: int = 1024) -> Cluster:
    """Hosts of one node of `cores` cores and `memory` MiB; on host a, job "own" holds cpus
    0-1 and 512 MiB."""
    cluster = Cluster([make_host(h, nodes=1, cores=cores, memory_mib=memory) for h in hosts])
    cluster.reserve("own", _alloc("a", 0, (0, 1), 512), Request(2, 512, numa=STRICT))
    return cluster


def test_lendable_needs_the_whole_idle_window_and_never_vcpu_0() -> None:
    owners = {"own": _alloc("a", 0, (4, 5, 6), 512)}
    # vCPU 0 idle longest: still never lent; vCPU 1 idle long enough; vCPU 2 not yet
    assert lendable_cpus(owners, {"own": [900.0, 600.0, 599.0]}, 600) == {"own": frozenset({5})}
    assert lendable_cpus(owners, {"own": [900.0, 0.0, 0.0]}, 600) == {}
    assert lendable_cpus(owners, {}, 600) == {}  # not measured yet: lends nothing
    assert lendable_cpus(owners, {"own": [900.0, 900.0]}, 600) == {}  # another shape: no
    # a core already lent is not lent twice
    assert lendable_cpus(owners, {"own": [0.0, 700.0, 700.0]}, 600, {("a", 5)}) == \
        {"own": frozenset({6})}


def test_lendable_view_frees_only_the_lent_cpus_and_keeps_the_owners_memory() -> None:
    cluster = _owner_cluster(memory=1024)
    view = lendable_view(cluster, {"own": {1}})
    node = view.free("a").nodes[0]
    assert (node.cpus_free, node.memory_free_mib) == (1, 512)
    assert view.allocation_of("own").cpus == (0,)
    assert cluster.free("a").nodes[0].cpus_free == 0  # the cluster itself is unchanged
    assert cluster.allocation_of("own").cpus == (0, 1)


def test_borrower_goes_on_a_lent_core_with_free_memory_beside_it() -> None:
    cluster = _owner_cluster(memory=1024)
    owners = {"own": cluster.allocation_of("own")}
    found = place_borrower(cluster, Request(1, 256), {"own": {1}}, owners)
    assert found is not None
    alloc, loans = found
    assert alloc.cpus == (1,) and alloc.nodes[0].node == 0
    assert loans == (Loan("", "own", "a", 1),)
    # the owner's memory is never lent: 512 MiB are free, a 768 MiB borrower does not fit
    assert place_borrower(cluster, Request(1, 768), {"own": {1}}, owners) is None
    assert place_borrower(cluster, Request(2, 256), {"own": {1}}, owners) is None


def test_a_borrower_takes_lent_and_free_cores_but_loans_only_the_lent_ones() -> None:
    cluster = _owner_cluster(cores=3)  # cpu 2 is free, cpu 1 lendable
    owners = {"own": cluster.allocation_of("own")}
    found = place_borrower(cluster, Request(2, 128), {"own": {1}}, owners)
    assert found is not None
    alloc, loans = found
    assert sorted(alloc.cpus) == [1, 2] and loans == (Loan("", "own", "a", 1),)


def test_give_back_when_the_owner_uses_a_lent_core_again() -> None:
    loans = [Loan("b1", "own", "a", 1), Loan("b1", "own2", "a", 5),
             Loan("b2", "own", "a", 2), Loan("b3", "own3", "a", 7)]
    # own's vCPU on cpu 1 is busy: b1 leaves all its lent cores (it moves as a whole)
    assert give_back(loans, {"own": {1}}) == {"b1": (loans[0], loans[1])}
    assert give_back(loans, {"own": {0}, "own3": set()}) == {}  # busy where nothing is lent
    assert give_back(loans, {}, gone={"own3"}) == {"b3": (loans[3],)}
    assert give_back([], {"own": {1}}) == {}


def test_give_back_moves_first_to_free_cores_of_the_host_as_a_repin() -> None:
    cluster = _owner_cluster(cores=3)  # cpu 2 is free
    full = _alloc("a", 0, (1,), 256)
    cluster.reserve("b", without_cpus(full, {1}), Request(1, 256))
    move = move_for_give_back(cluster, "b", full, Request(1, 256))
    assert isinstance(move, Repin) and move.allocation is not None
    assert move.allocation.cpus == (2,) and move.host == "a"


def test_give_back_migrates_when_only_another_host_has_room() -> None:
    cluster = _owner_cluster(hosts="ab")
    full = _alloc("a", 0, (1,), 256)
    cluster.reserve("b", without_cpus(full, {1}), Request(1, 256))
    move = move_for_give_back(cluster, "b", full, Request(1, 256))
    assert isinstance(move, Migrate) and move.to_host == "b"


def test_give_back_checkpoints_when_nothing_is_free() -> None:
    cluster = _owner_cluster()
    full = _alloc("a", 0, (1,), 256)
    cluster.reserve("b", without_cpus(full, {1}), Request(1, 256))
    assert move_for_give_back(cluster, "b", full, Request(1, 256)) == Checkpoint("b", 256)
