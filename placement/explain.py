"""Turning filter verdicts into an `Explanation`: the reasons, and one line a user can act on."""

from __future__ import annotations

from collections.abc import Sequence

from placement.filters import slots, units
from placement.fit import HostFit, Option
from placement.ledger import HostLedger
from placement.need import Need
from placement.results import Explanation, Reason
from placement.units import format_mib, format_page, plural

SHOWN = 4  # hosts named in a summary before "and N more"
_ORDER = {"cpus": 0, "memory": 0, "hugepages": 0, "nics": 0, "numa": 0, "anti_affinity": 1,
          "state": 2, "labels": 3, "pool": 3, "threads": 3, "host": 4}


def where(option: Option) -> str:
    return f"{option.host}/" + "+".join(f"node{node}" for node, _, _ in option.shares)


def placed(option: Option) -> Explanation:
    return Explanation(True, False, (), f"fits on {where(option)}")


def unknown_host(name: str) -> Explanation:
    reason = Reason(name, None, f"{name}: unknown host", "host")
    return Explanation(False, True, (reason,), f"unknown host {name!r}")


def invalid(need: Need) -> Explanation:
    assert need.problem is not None
    return Explanation(False, True, (Reason("", None, need.problem, "request"),), need.problem)


def fits_now(fits: Sequence[HostFit], reasons: tuple[Reason, ...]) -> Explanation:
    ok = [f for f in fits if f.fits]
    example = where(ok[0].options[0])
    summary = f"fits now: {plural(len(ok), 'host')} {'has' if len(ok) == 1 else 'have'} room, " \
              f"e.g. {example}"
    return Explanation(True, False, reasons, summary)


def all_reasons(fits: Sequence[HostFit], pinned: bool) -> tuple[Reason, ...]:
    # When the request names a host, "not host x" on every other host is noise.
    return tuple(r for f in fits for r in f.reasons if not (pinned and r.kind == "host"))


def not_now(need: Need, fits: Sequence[HostFit]) -> Explanation:
    pinned = need.request.host is not None
    reasons = all_reasons(fits, pinned)
    firsts = sorted(
        (f.reasons[0] for f in fits if f.reasons and not (pinned and f.reasons[0].kind == "host")),
        key=lambda r: _ORDER.get(r.kind, 0),
    )
    if len({r.kind for r in firsts}) > 1:
        # Hosts outside the pool or lacking labels are not worth a user's attention when
        # others came close.
        firsts = [r for r in firsts if r.kind not in ("pool", "labels")] or firsts
    shown = "; ".join(r.message for r in firsts[:SHOWN])
    more = len(firsts) - SHOWN
    if more > 0:
        shown += f"; and {plural(more, 'more host')}"
    lead = f"host {need.request.host} has no room now" if pinned else "no host has room now"
    return Explanation(False, False, reasons, f"{lead}: {shown}")


def never(need: Need, fits: Sequence[HostFit], empty: Sequence[tuple[HostLedger, HostFit]],
          mode: str) -> Explanation:
    """The request fails on every host even when empty: say which limit it is over."""
    pinned = need.request.host is not None
    reasons = all_reasons(fits, pinned)
    eligible = [ledger for ledger, fit in empty if not _static_failure(fit)]
    if eligible:
        summary = _too_big(need, eligible, mode)
    else:
        summary = _no_host_matches(need, [fit for _, fit in empty])
    return Explanation(False, True, reasons, summary)


def _static_failure(fit: HostFit) -> bool:
    return bool(fit.reasons) and fit.reasons[0].kind in ("host", "pool", "labels", "threads")


def _no_host_matches(need: Need, fits: Sequence[HostFit]) -> str:
    request = need.request
    kinds = {f.reasons[0].kind for f in fits if f.reasons}
    if request.host is not None:
        mine = [f for f in fits if f.host == request.host]
        return mine[0].reasons[0].message if mine and mine[0].reasons else "no host matches"
    if kinds == {"pool"}:
        return f"no host is in pool {request.pool}"
    labels = ", ".join(f"{k}={v}" for k, v in request.labels)
    in_pool = f" in pool {request.pool}" if request.pool else ""
    if kinds <= {"pool", "labels"} and request.labels:
        return f"no host{in_pool} has label {labels}"
    shown = "; ".join(f.reasons[0].message for f in fits[:SHOWN] if f.reasons)
    return f"no host matches: {shown}"


def _too_big(need: Need, eligible: Sequence[HostLedger], mode: str) -> str:
    request = need.request
    if request.host is not None:
        scope = f"host {request.host}"
    elif request.pool is not None:
        scope = f"any host in pool {request.pool}"
    else:
        scope = "any host"
    if mode == "node":
        nodes = [[n] for ledger in eligible for n in ledger.nodes]
        owners = [ledger for ledger in eligible for _ in ledger.nodes]
        subject, suffix = f"largest NUMA node on {scope}", " with --numa strict"
    else:
        nodes = [list(ledger.nodes) for ledger in eligible]
        owners = list(eligible)
        subject = "largest host" if scope == "any host" else (
            f"host {request.host}" if request.host else f"largest host in pool {request.pool}")
        suffix = ""
    cores = "whole core" if need.isolate else "core"
    most_cpus = max(sum(slots(n, need) for n in group) for group in nodes)
    most_mem = max(sum(units(n, need) for n in group) for group in nodes)
    most_nics = max(
        sum(1 for n in group for a in n.shape.nics if need.wants(owner.devices[a]))
        for group, owner in zip(nodes, owners, strict=True)
    )
    parts = []
    if most_cpus < need.slots:
        extra = " --threads isolate" if need.isolate and suffix else ""
        parts.append(f"{subject} has {plural(most_cpus, cores)}; "
                     f"asked for {need.slots}{suffix}{extra}")
    if most_mem < need.units:
        if need.page_kib is None:
            parts.append(f"{subject} has {format_mib(most_mem)} of memory; "
                         f"asked for {need.memory_text()}{suffix}")
        else:
            in_pages = format_mib(most_mem * need.page_kib // 1024)
            parts.append(f"{subject} has {in_pages} in {format_page(need.page_kib)} hugepages; "
                         f"asked for {need.memory_text()}{suffix}")
    if most_nics < need.nics:
        parts.append(f"{subject} has {plural(most_nics, 'NIC')}{need.nic_filter_text()}; "
                     f"asked for {need.nics}{suffix}")
    if parts:
        return "; ".join(parts)
    wanted = [plural(need.slots, cores), f"{need.memory_text()} of memory"]
    if need.nics:
        wanted.append(plural(need.nics, "NIC") + need.nic_filter_text())
    together = ", ".join(wanted[:-1]) + " and " + wanted[-1]
    if mode == "node":
        return f"no single NUMA node on {scope} has {together}{suffix}"
    return f"no host has {together} on NUMA nodes it can combine"
