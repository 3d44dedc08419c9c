"""Cluster snapshots as plain data, for planning offline (`vmjob plan rebalance --snapshot`).

Format (JSON-ready dicts; documented in docs/placement.md):

    {"hosts": [{"name": str, "nodes": [{"id": int, "cpus": int, "memory_mib": int}]}],
     "jobs": [{"id": str, "host": str,
               "nodes": [{"node": int, "cpus": int, "memory_mib": int}],
               "movable": bool}]}     # optional, default true

A snapshot counts cpus, not cpu ids: node i's cpus get consecutive ids, one core each, and
each job is given the lowest free ids of its nodes. Jobs are movable (reserved with a request
for their cpus and memory: strict on one node, prefer when they span) unless `"movable":
false`: then their request names their host, which keeps every planner from moving them. A
live job that names its host, uses hugepages or holds NICs is written so: a snapshot carries
no pools, devices or host constraints, and an offline plan moving it would be one the live
planner could not carry out.
"""

from __future__ import annotations

from typing import Any

from placement.cluster import Cluster
from placement.errors import Conflict
from placement.model import Allocation, Cpu, Host, HostState, Node, NodeShare, NumaPolicy, Request


class SnapshotError(ValueError):
    """The snapshot is not in the documented format; the message says where."""


def _int(value: Any, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SnapshotError(f"{where} must be a whole number >= {least}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SnapshotError(f"{where} must be a non-empty string")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise SnapshotError(f"{where} must be a list")
    return value


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SnapshotError(f"{where} must be an object")
    return value


def cluster_from_snapshot(data: Any) -> Cluster:
    """The cluster a snapshot describes, every job reserved with its request.

    Raises SnapshotError naming the first field that breaks the format, an unknown host or
    node, a repeated name, or a job that does not fit where it says it runs.
    """
    top = _dict(data, "snapshot")
    hosts = []
    for i, raw in enumerate(_list(top.get("hosts"), "hosts")):
        where = f"hosts[{i}]"
        entry = _dict(raw, where)
        name = _str(entry.get("name"), f"{where}.name")
        nodes = []
        next_cpu = 0
        seen: set[int] = set()
        for k, raw_node in enumerate(_list(entry.get("nodes"), f"{where}.nodes")):
            at = f"{where}.nodes[{k}]"
            node = _dict(raw_node, at)
            node_id = _int(node.get("id"), f"{at}.id", 0)
            if node_id in seen:
                raise SnapshotError(f"{at}.id: node {node_id} repeats on host {name}")
            seen.add(node_id)
            count = _int(node.get("cpus"), f"{at}.cpus", 0)
            cpus = tuple(Cpu(c, c, 0, frozenset({c})) for c in range(next_cpu, next_cpu + count))
            next_cpu += count
            nodes.append(Node(node_id, cpus, _int(node.get("memory_mib"), f"{at}.memory_mib", 0)))
        hosts.append(Host(name, tuple(nodes)))
    try:
        cluster = Cluster(hosts)
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None
    seen_jobs: set[str] = set()
    for i, raw in enumerate(_list(top.get("jobs", []), "jobs")):
        where = f"jobs[{i}]"
        entry = _dict(raw, where)
        job_id = _str(entry.get("id"), f"{where}.id")
        if job_id in seen_jobs:
            raise SnapshotError(f"{where}.id: job {job_id} repeats")
        seen_jobs.add(job_id)
        host = _str(entry.get("host"), f"{where}.host")
        if host not in cluster.hosts:
            raise SnapshotError(f"{where}.host: no host {host!r} in the snapshot")
        ledger = cluster._ledger(host)
        shares = []
        for k, raw_share in enumerate(_list(entry.get("nodes"), f"{where}.nodes")):
            at = f"{where}.nodes[{k}]"
            share = _dict(raw_share, at)
            node_id = _int(share.get("node"), f"{at}.node", 0)
            node = ledger.node(node_id)
            if node is None:
                raise SnapshotError(f"{at}.node: host {host} has no node {node_id}")
            cpus = _int(share.get("cpus"), f"{at}.cpus", 1)
            free = sorted(node.free)
            if len(free) < cpus:
                raise SnapshotError(f"{at}: node {node_id} of {host} has {len(free)} cpus "
                                    f"free, job {job_id} holds {cpus}")
            shares.append(NodeShare(node_id, tuple(free[:cpus]),
                                    _int(share.get("memory_mib"), f"{at}.memory_mib", 1)))
        if not shares:
            raise SnapshotError(f"{where}.nodes: job {job_id} holds no node")
        cpus_held = tuple(c for s in shares for c in s.cpus)
        memory = sum(s.memory_mib for s in shares)
        alloc = Allocation(host, cpus_held, memory, tuple(shares))
        numa = NumaPolicy.STRICT if len(shares) == 1 else NumaPolicy.PREFER
        movable = entry.get("movable", True)
        if not isinstance(movable, bool):
            raise SnapshotError(f"{where}.movable must be true or false")
        request = Request(len(cpus_held), memory, numa=numa, host=None if movable else host)
        try:
            cluster.reserve(job_id, alloc, request)
        except Conflict as exc:
            raise SnapshotError(f"{where}: {exc}") from None
    return cluster


def snapshot_of(cluster: Cluster) -> dict[str, Any]:
    """`cluster` in the snapshot format: up hosts, with usable cpus and allocatable memory per
    node; every job held on them (idle siblings counted as the job's cpus), `"movable": false`
    on those held without a request, whose request names their host, or that hold hugepages
    or NICs."""
    hosts = []
    for name in cluster.hosts:
        ledger = cluster._ledger(name)
        if ledger.host.state != HostState.UP:
            continue
        hosts.append({"name": name, "nodes": [
            {"id": n.shape.id, "cpus": len(n.shape.cpus), "memory_mib": n.shape.memory_mib}
            for n in ledger.nodes]})
    up = {h["name"] for h in hosts}
    jobs = []
    for job_id, alloc in sorted(cluster.allocations().items()):
        if alloc.host not in up:
            continue
        ledger = cluster._ledger(alloc.host)
        idle: dict[int, int] = {}
        for cpu in alloc.idle_cpus:
            idle[ledger.node_of_cpu[cpu]] = idle.get(ledger.node_of_cpu[cpu], 0) + 1
        job: dict[str, Any] = {"id": job_id, "host": alloc.host, "nodes": [
            {"node": s.node, "cpus": len(s.cpus) + idle.get(s.node, 0),
             "memory_mib": s.memory_mib} for s in alloc.nodes]}
        request = cluster.request_of(job_id)
        # Held without a request, the planners never move it either.
        if request is None or request.host is not None or alloc.hugepage_kib or alloc.devices:
            job["movable"] = False
        jobs.append(job)
    return {"hosts": hosts, "jobs": jobs}
