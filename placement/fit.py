"""Fitting a request onto one host: the options it offers, or the reasons it offers none.

An `Option` says how much of the request each NUMA node of the host would carry; it is cheap
(counts only). The cpus themselves are picked only for the option a policy finally chooses.
NUMA policies map onto three modes:

- "node": everything on one node (`strict`, and the first pass of `prefer`);
- "span": the host's nodes together (the second pass of `prefer`);
- "either": one node when the host has one that fits, otherwise span (`any`).
"""

from __future__ import annotations

from dataclasses import dataclass

from placement.filters import (
    HOST_FILTERS,
    NODE_FILTERS,
    SPAN_FILTERS,
    HostFilter,
    free_nics,
    slots,
    units,
)
from placement.ledger import HostLedger, NodeLedger
from placement.need import Need
from placement.results import Reason


@dataclass(frozen=True)
class Option:
    host: str
    shares: tuple[tuple[int, int, int], ...]  # (node id, vCPUs, memory units), by node id
    nics: tuple[str, ...]


@dataclass(frozen=True)
class HostFit:
    host: str
    options: tuple[Option, ...]
    reasons: tuple[Reason, ...]  # why not, when there are no options

    @property
    def fits(self) -> bool:
        return bool(self.options)


def node_options(ledger: HostLedger, need: Need) -> tuple[tuple[Option, ...], tuple[Reason, ...]]:
    options: list[Option] = []
    reasons: list[Reason] = []
    for node in ledger.nodes:
        failed = ()
        for check in NODE_FILTERS:
            failed = check(ledger, node, need)
            if failed:
                break
        if failed:
            reasons.extend(failed)
            continue
        nics = tuple(free_nics(ledger, node, need)[: need.nics])
        options.append(Option(ledger.host.name, ((node.shape.id, need.slots, need.units),), nics))
    return tuple(options), tuple(reasons)


def split(cpus: int, memory: int,
          nodes: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...] | None:
    """Spread `cpus` and `memory` over (node, free slots, free memory) nodes, fewest nodes first.

    Every node used gets at least one vCPU and one unit of memory (the guest mirrors each as a
    NUMA cell, and a cell needs both); memory follows the vCPUs proportionally where it can.
    Returns the shares by node id, or None when the free capacity cannot be combined so.
    """
    usable = sorted((n for n in nodes if n[1] > 0 and n[2] > 0), key=lambda n: (-n[1], -n[2], n[0]))
    chosen: list[tuple[int, int, int]] = []
    have_cpus = have_memory = 0
    for node in usable:
        if have_cpus >= cpus and have_memory >= memory:
            break
        chosen.append(node)
        have_cpus += node[1]
        have_memory += node[2]
    if have_cpus < cpus or have_memory < memory or len(chosen) > min(cpus, memory):
        return None
    given = [1] * len(chosen)
    left = cpus - len(chosen)
    for i, (_, free, _) in enumerate(chosen):
        extra = min(free - 1, left)
        given[i] += extra
        left -= extra
    mem = [min(free_mem, max(1, memory * given[i] // cpus))
           for i, (_, _, free_mem) in enumerate(chosen)]
    short = memory - sum(mem)
    for i, (_, _, free_mem) in enumerate(chosen):
        extra = min(free_mem - mem[i], short) if short > 0 else -min(mem[i] - 1, -short)
        mem[i] += extra
        short -= extra
    return tuple(sorted((node[0], given[i], mem[i]) for i, node in enumerate(chosen)))


def span_option(ledger: HostLedger, need: Need) -> tuple[tuple[Option, ...], tuple[Reason, ...]]:
    for check in SPAN_FILTERS:
        failed = check(ledger, need)
        if failed:
            return (), failed
    shares = split(need.slots, need.units,
                   [(n.shape.id, slots(n, need), units(n, need)) for n in ledger.nodes])
    name = ledger.host.name
    if shares is None:
        message = f"{name}: its free cores and free memory are on different NUMA nodes"
        return (), (Reason(name, None, message, "numa"),)
    used = {s[0] for s in shares}
    # NICs next to the job's cpus first, then from the host's other nodes.
    ordered = sorted(ledger.nodes, key=lambda n: (n.shape.id not in used, n.shape.id))
    nics = [a for n in ordered for a in free_nics(ledger, n, need)][: need.nics]
    return (Option(name, shares, tuple(nics)),), ()


def fit_host(ledger: HostLedger, need: Need, mode: str,
             host_filters: tuple[HostFilter, ...] = HOST_FILTERS) -> HostFit:
    name = ledger.host.name
    for check in host_filters:
        failed = check(ledger, need.request)
        if failed:
            return HostFit(name, (), failed)
    if mode == "span":
        options, reasons = span_option(ledger, need)
    else:
        options, reasons = node_options(ledger, need)
        if not options and mode == "either":
            options, reasons = span_option(ledger, need)
    return HostFit(name, options, reasons)


def node_is_empty(node: NodeLedger) -> bool:
    return node.is_empty() and len(node.nics_free) == len(node.shape.nics)
