"""Placement values to and from JSON-ready dicts (the store and `--json` output use them)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from placement import Allocation, NodeShare, NumaPolicy, Request, ThreadPolicy


def allocation_to_dict(alloc: Allocation) -> dict[str, Any]:
    return asdict(alloc)


def allocation_from_dict(data: dict[str, Any]) -> Allocation:
    return Allocation(
        host=data["host"],
        cpus=tuple(data["cpus"]),
        memory_mib=data["memory_mib"],
        nodes=tuple(
            NodeShare(node=n["node"], cpus=tuple(n["cpus"]), memory_mib=n["memory_mib"])
            for n in data["nodes"]
        ),
        devices=tuple(data.get("devices", ())),
        hugepage_kib=data.get("hugepage_kib"),
        idle_cpus=tuple(data.get("idle_cpus", ())),
    )


def request_to_dict(request: Request) -> dict[str, Any]:
    data = asdict(request)
    data["numa"] = request.numa.value
    data["threads"] = request.threads.value
    data["labels"] = dict(request.labels)
    return data


def request_from_dict(data: dict[str, Any]) -> Request:
    fields = dict(data)
    fields["numa"] = NumaPolicy(fields.get("numa", NumaPolicy.PREFER.value))
    fields["threads"] = ThreadPolicy(fields.get("threads", ThreadPolicy.DEDICATED.value))
    fields["labels"] = tuple(sorted(dict(fields.get("labels", {})).items()))
    return Request(**fields)
