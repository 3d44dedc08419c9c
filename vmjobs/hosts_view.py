"""What `vmjob hosts` shows: every configured host's capacity, free and total, per NUMA node."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import placement
from placement import HostUsage
from vmjobs.config import Config
from vmjobs.snapshot import snapshot
from vmjobs.store import Store
from vmjobs.virt.conn import Reached, connect_hosts


@dataclass(frozen=True)
class HostView:
    name: str
    uri: str
    usage: HostUsage | None  # None: the host could not be reached
    error: str | None = None
    warnings: tuple[str, ...] = ()  # see vmjobs.host_checks
    pools: tuple[str, ...] = ()  # the config's pools of the host

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "uri": self.uri,
                                "state": self.usage.state.value if self.usage else "down"}
        if self.pools:
            data["pools"] = list(self.pools)
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


def live_cluster(config: Config, only: str | None = None) -> tuple[placement.Cluster, Reached]:
    """The engine's view of the configured hosts (or `only`) as they are now: inventory from
    libvirt, holdings and cordons from the store. The connections are closed on return; the
    `Reached` is kept for what it says about the hosts (errors, warnings)."""
    reached = connect_hosts(config, only)
    store = Store(config.state_db)
    try:
        return snapshot(store, reached.hosts), reached
    finally:
        store.close()
        reached.close()


def host_views(config: Config, only: str | None = None) -> list[HostView]:
    cluster, reached = live_cluster(config, only)
    chosen = [config.host(only)] if only else config.hosts
    return [
        HostView(h.name, h.uri, cluster.free(h.name) if h.name in cluster.hosts else None,
                 reached.errors.get(h.name), tuple(reached.warnings.get(h.name, ())), h.pools)
        for h in chosen
    ]
