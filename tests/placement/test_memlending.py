"""Lending memory an owner's balloon reports spare (placement/memlending.py, pure): the rule,
the lendable view, where a borrower's memory comes from, and when it is given back."""

from __future__ import annotations

import pytest

from placement import Allocation, Cluster, NodeShare, NumaPolicy, Request
from placement.lending import Loan
from placement.memlending import (
    MemoryLoan,
    lendable_memory,
    lendable_view_with_memory,
    memory_give_back,
    place_borrower_with_memory,
    without_memory,
)
from placement.synthetic import make_host

STRICT = NumaPolicy.STRICT


def _alloc(host: str, node: int, cpus: tuple[int, ...], memory: int) -> Allocation:
    return Allocation(host, cpus, memory, (NodeShare(node, cpus, memory),))


def _cluster(cores: int = 2, memory: int = 1024, owner_mib: int = 768) -> Cluster:
    """Host a, one node of `cores` cores and `memory` MiB; job "own" holds cpus 0-1 and
    `owner_mib` MiB."""
    cluster = Cluster([make_host("a", nodes=1, cores=cores, memory_mib=memory)])
    cluster.reserve("own", _alloc("a", 0, (0, 1), owner_mib), Request(2, owner_mib, numa=STRICT))
    return cluster


def test_the_rule_is_the_smallest_spare_less_the_margin_and_what_is_lent() -> None:
    owners = {"own": _alloc("a", 0, (0, 1), 768)}
    assert lendable_memory(owners, {"own": 600}, 100) == {"own": 500}
    # what it lends already counts against it; nothing left: not listed
    assert lendable_memory(owners, {"own": 600}, 100,
                           [MemoryLoan("b", "own", "a", 0, 300)]) == {"own": 200}
    assert lendable_memory(owners, {"own": 600}, 100,
                           [MemoryLoan("b", "own", "a", 0, 500)]) == {}
    assert lendable_memory(owners, {"own": 100}, 100) == {}  # spare within the margin
    assert lendable_memory(owners, {}, 100) == {}  # no covering reading: nothing
    # never more than it holds, whatever its balloon says
    assert lendable_memory(owners, {"own": 5000}, 100) == {"own": 768}


def test_only_one_node_owners_without_hugepages_lend_memory() -> None:
    two = Allocation("a", (0, 1), 1024, (NodeShare(0, (0,), 512), NodeShare(1, (1,), 512)))
    huge = Allocation("a", (2,), 512, (NodeShare(0, (2,), 512),), hugepage_kib=2048)
    assert lendable_memory({"two": two, "huge": huge}, {"two": 900, "huge": 500}, 10) == {}


def test_without_memory_takes_from_the_one_node() -> None:
    alloc = _alloc("a", 0, (0, 1), 768)
    less = without_memory(alloc, 256)
    assert (less.memory_mib, less.nodes[0].memory_mib, less.cpus) == (512, 512, (0, 1))
    assert without_memory(alloc, 0) is alloc
    with pytest.raises(ValueError):
        without_memory(alloc, 769)


def test_the_view_frees_lent_memory_and_cores_and_leaves_the_cluster_alone() -> None:
    cluster = _cluster(memory=1024, owner_mib=768)
    view = lendable_view_with_memory(cluster, {"own": {1}}, {"own": 300})
    node = view.free("a").nodes[0]
    assert (node.cpus_free, node.memory_free_mib) == (1, 256 + 300)
    assert cluster.free("a").nodes[0].memory_free_mib == 256


def test_a_borrower_uses_free_memory_first_and_borrows_the_rest_beside_its_lent_core() -> None:
    cluster = _cluster(memory=1024, owner_mib=768)  # 256 MiB free
    owners = {"own": cluster.allocation_of("own")}
    found = place_borrower_with_memory(cluster, Request(1, 384), {"own": {1}}, {"own": 300},
                                       owners)
    assert found is not None
    assert found.allocation.cpus == (1,) and found.allocation.nodes[0].node == 0
    assert found.loans == (Loan("", "own", "a", 1),)
    assert found.memory_loans == (MemoryLoan("", "own", "a", 0, 128),)  # 384 - 256 free
    # within free memory: a core loan only
    small = place_borrower_with_memory(cluster, Request(1, 128), {"own": {1}}, {"own": 300},
                                       owners)
    assert small is not None and small.memory_loans == ()
    # more than free + lendable: no place
    assert place_borrower_with_memory(cluster, Request(1, 600), {"own": {1}}, {"own": 300},
                                      owners) is None


def test_borrowed_memory_comes_from_the_largest_lenders_on_the_node_first() -> None:
    cluster = Cluster([make_host("a", nodes=1, cores=4, memory_mib=1024)])
    for job, cpus in (("big", (0, 1)), ("small", (2,))):
        cluster.reserve(job, _alloc("a", 0, cpus, 448), Request(len(cpus), 448, numa=STRICT))
    owners = {job: cluster.allocation_of(job) for job in ("big", "small")}
    # cpu 3 and 128 MiB are free: a 1-cpu 400 MiB borrower borrows 272 MiB
    found = place_borrower_with_memory(cluster, Request(1, 400), {}, {"big": 200, "small": 100},
                                       owners)
    assert found is not None and found.allocation.cpus == (3,)
    assert found.loans == ()  # free core, lent memory: still a borrower's place
    assert found.memory_loans == (MemoryLoan("", "big", "a", 0, 200),
                                  MemoryLoan("", "small", "a", 0, 72))
    # free core and free memory: the ordinary queue's, not a loan
    assert place_borrower_with_memory(cluster, Request(1, 100), {}, {"big": 200}, owners) \
        is None


def test_memory_lent_on_one_node_is_not_used_on_another() -> None:
    cluster = Cluster([make_host("a", nodes=2, cores=2, memory_mib=512)])
    cluster.reserve("own", _alloc("a", 0, (0, 1), 512), Request(2, 512, numa=STRICT))
    owners = {"own": cluster.allocation_of("own")}
    # node 1 has 2 free cores and 512 MiB free; 700 MiB fits on neither node
    assert place_borrower_with_memory(cluster, Request(1, 700), {}, {"own": 400}, owners) \
        is None
    # 400 MiB: node 0 (its lent memory) or node 1 (free) — either way it borrows only
    # what its node lacks
    found = place_borrower_with_memory(cluster, Request(1, 400), {"own": {1}}, {"own": 400},
                                       owners)
    assert found is not None
    node = found.allocation.nodes[0].node
    assert sum(m.mib for m in found.memory_loans) == (400 if node == 0 else 0)


def test_memory_is_given_back_when_the_spare_falls_below_the_loan_plus_half_the_margin() -> None:
    loans = [MemoryLoan("b1", "own", "a", 0, 200), MemoryLoan("b2", "own", "a", 0, 100),
             MemoryLoan("b3", "other", "a", 0, 100)]
    margin = 100
    # own lends 300: kept while its spare is >= 350
    assert memory_give_back(loans, {"own": 350, "other": 1000}, margin) == {}
    ends = memory_give_back(loans, {"own": 349, "other": 1000}, margin)
    assert ends == {"b1": (loans[0],), "b2": (loans[1],)}
    # no reading now: kept until there is one
    assert memory_give_back(loans, {"own": None}, margin) == {}
    assert memory_give_back(loans, {}, margin) == {}
