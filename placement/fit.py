"""Fitting a request onto one host: the options it offers, or the reasons it offers none.

An `Option` says how much of the request each NUMA node of the host would carry; it is cheap
(counts only). The cpus themselves are picked only for the option a policy finally chooses.
NUMA policies map onto three modes:

- "node": everything on one node (`strict`, and the first pass of `prefer`);
- "span": the host's nodes together (the second pass of `prefer`);
- "either": one node when the host has one that fits, otherwise span (`any`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from placement.filters import (
    HOST_FILTERS,
    NODE_FILTERS,
    SPAN_FILTERS,
    HostFilter,
    compatible,
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
        if not node.shape.cpus:
            continue  # a memory-only node never carries a job alone
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


Free = tuple[int, int, int]  # (node id, free slots, free memory units)
Distance = Callable[[int, int], int]


def split(cpus: int, memory: int, nodes: list[Free], distance: Distance | None = None,
          memory_nodes: list[tuple[int, int]] | None = None,
          ) -> tuple[tuple[int, int, int], ...] | None:
    """Spread `cpus` and `memory` over (node, free slots, free memory) nodes, fewest nodes first.

    Every node with cpus used gets at least one vCPU and one unit of memory (the guest mirrors
    each as a NUMA cell, and a cell needs both); memory follows the vCPUs proportionally where
    it can. With `distance` (node, node) -> SLIT distance, of the smallest sets of nodes that
    have room the one with the smallest sum of pairwise distances is taken (see `_choose`).
    `memory_nodes` (node id, free units) are memory-only nodes the request may use: they
    supply only what the chosen nodes lack, nearest first, and appear with 0 vCPUs.
    Returns the shares by node id, or None when the free capacity cannot be combined so.
    """
    spare_nodes = [m for m in memory_nodes or () if m[1] > 0]
    spare = sum(m[1] for m in spare_nodes)
    usable = [n for n in nodes if n[1] > 0 and n[2] > 0]
    chosen = _choose(cpus, memory - spare, usable, distance)
    have_cpus = sum(n[1] for n in chosen)
    have_memory = sum(n[2] for n in chosen) + spare
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
    shares = [(node[0], given[i], mem[i]) for i, node in enumerate(chosen)]
    ids = [n[0] for n in chosen]
    for node_id, free_mem in sorted(spare_nodes, key=lambda m: (_cost(m[0], ids, distance), m[0])):
        if short <= 0:
            break
        take = min(free_mem, short)
        shares.append((node_id, 0, take))
        short -= take
    return tuple(sorted(shares))


def _cost(node: int, chosen: list[int], distance: Distance | None) -> int:
    return sum(distance(node, c) for c in chosen) if distance is not None else 0


def _choose(cpus: int, memory: int, usable: list[Free], distance: Distance | None) -> list[Free]:
    """The nodes a span uses: enough free slots for `cpus` and free memory for `memory`.

    Without distances: the nodes with the most free slots first. With distances: that set is
    one candidate; the others grow from every node in turn, adding the node nearest to those
    already chosen until the set has room, then drop nodes it can do without, farthest
    first. Of the candidates the one with the fewest nodes, then the smallest sum of pairwise
    distances wins, so a span never uses more nodes than without distances (a greedy
    heuristic, O(n^3) for n nodes; trying every subset would be exponential).
    """
    order = sorted(usable, key=lambda n: (-n[1], -n[2], n[0]))

    def enough(nodes: list[Free]) -> bool:
        return sum(n[1] for n in nodes) >= cpus and sum(n[2] for n in nodes) >= memory

    fullest: list[Free] = []
    for node in order:
        if enough(fullest):
            break
        fullest.append(node)
    if distance is None or not enough(fullest):
        return fullest

    def spread(nodes: list[Free]) -> int:
        ids = [n[0] for n in nodes]
        return sum(_cost(a, ids[i + 1:], distance) for i, a in enumerate(ids))

    best = (len(fullest), spread(fullest)), fullest
    for seed in order:
        chosen = [seed]
        rest = [n for n in order if n is not seed]
        while not enough(chosen):
            nearest = min(rest, key=lambda n: _cost(n[0], [c[0] for c in chosen], distance))
            chosen.append(nearest)
            rest.remove(nearest)
        while len(chosen) > 1:
            ids = [c[0] for c in chosen]
            spare = [c for c in chosen if enough([o for o in chosen if o is not c])]
            if not spare:
                break
            chosen.remove(max(spare, key=lambda c: _cost(c[0], ids, distance)))
        key = (len(chosen), spread(chosen))
        if key < best[0]:
            best = key, chosen
    return best[1]


def distance_of(ledger: HostLedger) -> Distance | None:
    """The host's node distances as a function, or None when libvirt gave none for some node."""
    table = {n.shape.id: n.shape.distances for n in ledger.nodes}
    ids = set(table)
    if any(not ids <= set(d) for d in table.values()):
        return None
    return lambda a, b: table[a][b]


def span_option(ledger: HostLedger, need: Need) -> tuple[tuple[Option, ...], tuple[Reason, ...]]:
    for check in SPAN_FILTERS:
        failed = check(ledger, need)
        if failed:
            return (), failed
    distance = distance_of(ledger)
    shares = split(need.slots, need.units,
                   [(n.shape.id, slots(n, need), units(n, need)) for n in ledger.nodes
                    if n.shape.cpus],
                   distance,
                   [(n.shape.id, units(n, need)) for n in ledger.nodes if not n.shape.cpus])
    name = ledger.host.name
    if shares is None:
        message = f"{name}: its free cores and free memory are on different NUMA nodes"
        return (), (Reason(name, None, message, "numa"),)
    used = [s[0] for s in shares if s[1]]
    # NICs next to the job's cpus first, then from the host's other nodes, nearest first.
    ordered = sorted(ledger.nodes, key=lambda n: (n.shape.id not in used,
                                                  _cost(n.shape.id, used, distance), n.shape.id))
    nics = compatible(ledger, [a for n in ordered for a in free_nics(ledger, n, need)])
    return (Option(name, shares, tuple(nics[: need.nics])),), ()


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
