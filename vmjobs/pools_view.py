"""What `vmjob pools` shows (and `GET /v1/pools` answers): per pool, its members with their
free and total capacity, every current holder, and the pool's line of waiting jobs.

Holders are read from what the store says holds resources (`Store.holders`: every row of
`jobs` with an allocation), not from the daemon's memory, so anything that holds cores shows
up with its `kind`: a job, a migration's placeholder on its destination, or a row of another
kind (a held reservation) that names its own `kind` in its spec. The queue's positions and
reasons are the last scheduling pass's (`queue.Wait.lines`); without a daemon nobody
schedules, and they are null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import placement
from placement import HostUsage, Request
from vmjobs.daemon.queue import Wait, lines_of
from vmjobs.errors import NotFound
from vmjobs.jobs import JobRecord
from vmjobs.spec import time_limit_of
from vmjobs.store import Store


def kind_of(record: JobRecord) -> str:
    """"job", "migration" (a placeholder holding a migration's destination), or the `kind`
    a row of another sort names in its spec (e.g. "reservation")."""
    kind = record.spec.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return "migration" if "placeholder_for" in record.spec else "job"


def holder_view(record: JobRecord, since: float | None,
                ends_at: float | None = None) -> dict[str, Any]:
    """One holder: who, what, where, since when (s since the epoch: its first start, else
    its last change of state) and until when (its time limit's end; `ends_at` when the
    caller knows better, e.g. the daemon's own deadline; null: no limit)."""
    allocation = record.allocation or {}
    since = since if since is not None else record.updated
    limit = time_limit_of(record.spec)
    until = ends_at if ends_at is not None else (since + limit if limit else None)
    return {"kind": kind_of(record), "id": record.id, "owner": record.owner,
            "state": record.state.value, "host": allocation.get("host", record.host),
            "cpus": len(allocation.get("cpus") or ()),
            "memory_mib": allocation.get("memory_mib"),
            "nics": len(allocation.get("devices") or ()), "since": since, "until": until}


def member_view(host: str, usage: HostUsage | None) -> dict[str, Any]:
    if usage is None:
        return {"host": host, "state": "down", "cpus_free": None, "cpus_total": None,
                "memory_free_mib": None, "memory_total_mib": None, "nics_free": None,
                "nics_total": None}
    return {"host": host, "state": usage.state.value, "cpus_free": usage.cpus_free,
            "cpus_total": usage.cpus_total, "memory_free_mib": usage.memory_free_mib,
            "memory_total_mib": usage.memory_total_mib, "nics_free": usage.nics_free,
            "nics_total": usage.nics_total}


def build(pools: Mapping[str, Sequence[str]], cluster: placement.Cluster,
          holders: Sequence[dict[str, Any]], queued: Sequence[tuple[JobRecord, Request]],
          waits: Mapping[str, Wait], only: str | None = None) -> list[dict[str, Any]]:
    """Every pool of `pools` (name -> member hosts, from the config), or the one named
    `only` (NotFound, naming the pools there are, if there is none). `holders`: holder views
    (`holder_view`); `queued`: the queue in queue order; `waits`: the last pass's verdicts.
    A queued job is in a pool's queue if it waits in that pool's line (`queue.lines_of`)."""
    if only is not None and only not in pools:
        raise NotFound(f"no pool {only!r} (pools: {', '.join(pools) or 'none'})")
    scopes: dict[tuple[object, ...], tuple[str, ...]] = {}
    lines: dict[str, tuple[str, ...]] = {}
    for record, request in queued:
        key = (request.host, request.pool, request.labels, request.threads)
        if key not in scopes:
            scopes[key] = lines_of(cluster, request)[1]
        lines[record.id] = scopes[key]
    views = []
    for name, members in pools.items():
        if only is not None and name != only:
            continue
        usage = {h: cluster.free(h) if h in cluster.hosts else None for h in members}
        rows = [member_view(h, usage[h]) for h in members]
        queue = [_queued_view(record, request, waits.get(record.id), name)
                 for record, request in queued if name in lines[record.id]]
        queue.sort(key=lambda q: (q["position"] is None, q["position"] or 0))
        views.append({
            "name": name,
            "members": rows,
            "cpus_free": sum(r["cpus_free"] or 0 for r in rows),
            "cpus_total": sum(r["cpus_total"] or 0 for r in rows),
            "holders": [h for h in holders if h["host"] in members],
            "queue": queue,
        })
    return views


def _queued_view(record: JobRecord, request: Request, wait: Wait | None,
                 pool: str) -> dict[str, Any]:
    position = dict(wait.lines).get(pool) if wait is not None else None
    return {"id": record.id, "owner": record.owner, "position": position,
            "waiting_because": wait.reason if wait is not None else None,
            "held": wait.held if wait is not None else False,
            "cpus": request.cpus, "memory_mib": request.memory_mib, "nics": request.nics,
            "host": request.host, "created": record.created}


def from_store(store: Store, pools: Mapping[str, Sequence[str]], cluster: placement.Cluster,
               waits: Mapping[str, Wait], ends_at: Mapping[str, float],
               only: str | None = None) -> list[dict[str, Any]]:
    """`build` from what `store` says now (one read transaction): its holders with their
    start times, and its queue. `ends_at`: deadlines the caller knows (job id -> s)."""
    with store.reading():
        records = store.holders()
        started = store.started_at([r.id for r in records])
        # queue order: priority, then submission (sorted() is stable)
        queued = sorted(store.queued(), key=lambda q: -q[1].priority)
    holders = [holder_view(r, started.get(r.id), ends_at.get(r.id)) for r in records]
    return build(pools, cluster, holders, queued, waits, only)
