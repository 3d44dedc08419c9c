"""How many more jobs of one shape fit where: the "could start now" count of `vmjob profiles`
and of usage by profile. Pure: works on a copy of the cluster it is given."""

from __future__ import annotations

from dataclasses import replace

from placement.cluster import Cluster
from placement.model import Request

# Far beyond any host (a job holds at least one cpu): keeps the count bounded whatever it is
# asked about.
MAX_COUNT = 4096


def starts_possible(cluster: Cluster, request: Request, host: str,
                    limit: int = MAX_COUNT) -> int:
    """How many jobs of `request` could start on `host` now, one after the other, each placed
    as the scheduler places it (the "pack" policy) on what the ones before it left: 0 when
    the host is down, cordoned, outside the request's pool or labels, or full. `cluster` is
    not changed (the count reserves on a copy). At most `limit`. Raises UnknownHost for a
    host the cluster does not have."""
    cluster.free(host)  # UnknownHost before any work
    work = cluster.copy()
    pinned = replace(request, host=host)
    count = 0
    while count < limit:
        decision = work.place_within(pinned)
        if decision.allocation is None:
            break
        work.reserve(f"\0count-{count}", decision.allocation, pinned)
        count += 1
    return count


def could_start(cluster: Cluster, request: Request) -> bool:
    """Whether one more job of `request` would fit somewhere now (any host, pack policy)."""
    return cluster.place_within(request).allocation is not None
