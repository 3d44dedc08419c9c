"""Scorers: small pure functions rating an option between 0 (bad) and 1 (good), and policies.

A policy is a weighted sum of scorers plus the order in which hosts are tried. Scores only
compare options that already passed every filter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from placement.filters import slots, units
from placement.fit import Option
from placement.ledger import HostLedger, NodeLedger
from placement.need import Need

Scorer = Callable[[HostLedger, Need, Option], float]


def _used(ledger: HostLedger, option: Option) -> list[tuple[NodeLedger, int, int]]:
    by_id = {n.shape.id: n for n in ledger.nodes}
    return [(by_id[node], cpus, mem) for node, cpus, mem in option.shares]


def _capacity(node: NodeLedger, need: Need) -> tuple[int, int]:
    cpus = sum(node.shape.whole) if need.isolate else len(node.shape.cpus)
    mem = node.shape.memory_mib if need.page_kib is None else node.shape.hugepages.get(
        need.page_kib, 0)
    return cpus, mem


def best_fit(ledger: HostLedger, need: Need, option: Option) -> float:
    """1 when the nodes used are left with no free cpus: the tightest fit wastes least."""
    left = total = 0
    for node, cpus, _ in _used(ledger, option):
        left += slots(node, need) - cpus
        total += _capacity(node, need)[0]
    return 1.0 - left / total if total else 0.0


def worst_fit(ledger: HostLedger, need: Need, option: Option) -> float:
    return 1.0 - best_fit(ledger, need, option)


def keeps_nodes_whole(ledger: HostLedger, need: Need, option: Option) -> float:
    """Share of the nodes used that something already uses: empty nodes stay for big jobs."""
    used = _used(ledger, option)
    return sum(not node.is_empty() for node, _, _ in used) / len(used)


def keeps_hosts_whole(ledger: HostLedger, need: Need, option: Option) -> float:
    return 1.0 if ledger.jobs else 0.0


def empty_hosts(ledger: HostLedger, need: Need, option: Option) -> float:
    return 0.0 if ledger.jobs else 1.0


def balanced(ledger: HostLedger, need: Need, option: Option) -> float:
    """1 when cpus and memory run out together: no cores stranded without memory, or the reverse."""
    gaps = []
    for node, cpus, mem in _used(ledger, option):
        cap_cpus, cap_mem = _capacity(node, need)
        cpu_left = (slots(node, need) - cpus) / cap_cpus if cap_cpus else 0.0
        mem_left = (units(node, need) - mem) / cap_mem if cap_mem else 0.0
        gaps.append(abs(cpu_left - mem_left))
    return 1.0 - sum(gaps) / len(gaps)


def saves_nics(ledger: HostLedger, need: Need, option: Option) -> float:
    """Jobs without NICs keep off nodes with free NICs, which NIC jobs cannot do without."""
    if need.nics:
        return 1.0
    total = sum(len(n.shape.nics) for n in ledger.nodes)
    if not total:
        return 1.0
    return 1.0 - sum(len(node.nics_free) for node, _, _ in _used(ledger, option)) / total


def fewest_nodes(ledger: HostLedger, need: Need, option: Option) -> float:
    return 1.0 / len(option.shares)


@dataclass(frozen=True)
class Policy:
    name: str
    scorers: tuple[tuple[Scorer, float], ...]
    order: str  # "tight": fullest hosts first, "loose": emptiest first, "host": config order
    sample: int  # stop looking after this many hosts that fit (kube-scheduler does the same)


def score(policy: Policy, ledger: HostLedger, need: Need, option: Option) -> float:
    return sum(weight * scorer(ledger, need, option) for scorer, weight in policy.scorers)


POLICIES: dict[str, Policy] = {
    policy.name: policy
    for policy in (
        Policy(
            "pack",
            ((best_fit, 4.0), (keeps_nodes_whole, 2.0), (keeps_hosts_whole, 2.0),
             (balanced, 1.0), (saves_nics, 1.0), (fewest_nodes, 1.0)),
            order="tight",
            sample=8,
        ),
        Policy(
            "spread",
            ((worst_fit, 4.0), (empty_hosts, 2.0), (balanced, 1.0), (saves_nics, 1.0),
             (fewest_nodes, 1.0)),
            order="loose",
            sample=8,
        ),
        # What a plain queue does: the first host and node in configuration order that fits.
        Policy("firstfit", (), order="host", sample=1),
    )
}
