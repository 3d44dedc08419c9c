"""Gang placement: N requests placed together, all or none (an HPC job of N nodes, a CI job of
a server and a client).

Members that must not share a host carry an anti-affinity group (`Request.anti_affinity`),
which the engine's `anti_affinity` filter already enforces against every holder of the group,
so members placed earlier (in this decision or running already) push later ones away.
`apart_groups` names the groups: with at most K members per host, member i is in group
`i mod K`; a host then holds at most one member of each of the K groups, so at most K.

The decision places the members one by one on a copy of the cluster, each reserved before the
next is placed, largest first (cpus, then memory, then NICs: the hardest to fit go where there
is still most choice, the usual first-fit-decreasing order for bin packing). It is greedy, not
a search: when the greedy order fails, an assignment found by backtracking might exist. It
reserves nothing on the cluster it is given; the caller reserves the returned allocations
(together, in one store transaction).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from placement.cluster import Cluster
from placement.model import Allocation, Request


@dataclass(frozen=True)
class GangDecision:
    """All members' allocations, in the members' order, or none and why."""

    allocations: tuple[Allocation, ...] | None
    reason: str = ""  # why not, naming the member that did not fit

    @property
    def fits(self) -> bool:
        return self.allocations is not None


def apart_groups(gang_id: str, size: int, per_host: int | None) -> list[str | None]:
    """The anti-affinity group of each of `size` members: at most `per_host` members of the
    gang on one host (None: no limit, every member's group is None). Raises ValueError for a
    `per_host` below 1."""
    if per_host is None:
        return [None] * size
    if per_host < 1:
        raise ValueError(f"per_host must be at least 1, not {per_host}")
    return [f"gang:{gang_id}/{i % per_host}" for i in range(size)]


def with_groups(requests: Sequence[Request], groups: Sequence[str | None]) -> list[Request]:
    """`requests` with their anti-affinity groups set (one group per request)."""
    return [replace(r, anti_affinity=g) for r, g in zip(requests, groups, strict=True)]


def _size(request: Request) -> tuple[int, int, int]:
    return (request.cpus, request.memory_mib, request.nics)


def place_gang(cluster: Cluster, requests: Sequence[Request], policy: str = "pack",
               names: Sequence[str] | None = None) -> GangDecision:
    """Place every request of a gang on `cluster` (not changed), or none.

    `requests`: one per member, in index order (their `anti_affinity` groups keep apart
    members on distinct hosts). `names`: the members' names for the reason (default
    `member i`). Returns the allocations in the members' order; when one member does not fit
    beside the others, no allocation and the engine's summary for that member.
    """
    labels = list(names) if names is not None else [f"member {i}" for i in range(len(requests))]
    if not requests:
        return GangDecision((), "")
    work = cluster.copy()
    chosen: dict[int, Allocation] = {}
    for i in sorted(range(len(requests)), key=lambda k: _size(requests[k]), reverse=True):
        decision = work.place(requests[i], policy)
        if decision.allocation is None:
            others = f" beside the {len(chosen)} placed before it" if chosen else ""
            return GangDecision(None, f"{labels[i]} does not fit{others}: "
                                      f"{decision.explanation.summary}")
        work.reserve(f"\0gang-member-{i}", decision.allocation, requests[i])
        chosen[i] = decision.allocation
    return GangDecision(tuple(chosen[i] for i in range(len(requests))))


def gang_fits(cluster: Cluster, requests: Sequence[Request], policy: str = "pack") -> bool:
    """Whether `place_gang` would place the whole gang now."""
    return place_gang(cluster, requests, policy).fits


def gang_never_fits(cluster: Cluster, requests: Sequence[Request]) -> str | None:
    """Why the gang could not fit even on the empty cluster, or None when it might: a member
    no host could ever take, or more members of one anti-affinity group than there are hosts.
    A cheap bound, not a proof that it fits (the greedy order may still fail)."""
    for i, request in enumerate(requests):
        if not cluster.ever_fits(request):
            return f"member {i}: {cluster.explain(request).summary}"
    groups = Counter(r.anti_affinity for r in requests if r.anti_affinity is not None)
    hosts = len(cluster.hosts)
    for count in groups.values():
        if count > hosts:
            return (f"{count} members must be on distinct hosts, and the cluster has "
                    f"{hosts} host{'s' if hosts != 1 else ''}")
    return None
