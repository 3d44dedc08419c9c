"""What `vmjob hosts` shows: every configured host's capacity, free and total, per NUMA node."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from placement import HostUsage
from vmjobs.config import Config
from vmjobs.hostconn import connect_hosts
from vmjobs.runner import snapshot
from vmjobs.store import Store


@dataclass(frozen=True)
class HostView:
    name: str
    uri: str
    usage: HostUsage | None  # None: the host could not be reached
    error: str | None = None
    warnings: tuple[str, ...] = ()  # see vmjobs.host_checks

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "uri": self.uri,
                                "state": self.usage.state.value if self.usage else "down"}
        if self.error:
            data["error"] = self.error
        if self.warnings:
            data["warnings"] = list(self.warnings)
        if self.usage:
            data.update(
                jobs=self.usage.jobs,
                cpus_free=self.usage.cpus_free, cpus_total=self.usage.cpus_total,
                memory_free_mib=self.usage.memory_free_mib,
                memory_total_mib=self.usage.memory_total_mib,
                nics_free=self.usage.nics_free, nics_total=self.usage.nics_total,
                nodes=[asdict(n) for n in self.usage.nodes],
            )
        return data


def host_views(config: Config, only: str | None = None) -> list[HostView]:
    reached = connect_hosts(config, only)
    store = Store(config.state_db)
    try:
        cluster = snapshot(store, reached.hosts)
    finally:
        store.close()
        reached.close()
    chosen = [config.host(only)] if only else config.hosts
    return [
        HostView(h.name, h.uri, cluster.free(h.name) if h.name in cluster.hosts else None,
                 reached.errors.get(h.name), tuple(reached.warnings.get(h.name, ())))
        for h in chosen
    ]
