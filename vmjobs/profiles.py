"""Hardware profiles as the cluster sees them: each profile's request, and how many more jobs
of it could start now on each host (`vmjob profiles`, `GET /v1/profiles`).

A profile is a named set of spec fields (config `profiles:`, checked by
`vmjobs.spec.make_profile`); `--profile NAME` applies it where the spec is built
(`vmjobs.spec.apply_profile`).
"""

from __future__ import annotations

from typing import Any

from placement import Cluster, Request
from placement.capacity import starts_possible
from vmjobs.config import Config
from vmjobs.spec import Profile, parse


def request_of(profile: Profile) -> Request:
    """What one job of the profile asks the placement engine for (defaults where the profile
    sets nothing, as for a job given only `--profile`)."""
    return parse({"argv": ["true"], **profile.fields}).request()


def listing(config: Config, cluster: Cluster) -> list[dict[str, Any]]:
    """Every profile of `config` in the file's order: its fields (`Profile.to_dict`) and
    `hosts`: {host: how many more jobs of it could start there now (`starts_possible`), or
    None for a host the cluster does not have (not reached)}. `cluster` is not changed."""
    rows = []
    for profile in config.profiles.values():
        request = request_of(profile)
        hosts = {h.name: starts_possible(cluster, request, h.name)
                 if h.name in cluster.hosts else None for h in config.hosts}
        rows.append({**profile.to_dict(), "hosts": hosts})
    return rows


def usage_context(config: Config, cluster: Cluster) -> dict[str, Any]:
    """What `vmjobs.usage.report` needs beyond the events to group by pool or profile: each
    host's pools, the inventory, and each profile's request."""
    return {"pools": {h.name: h.pools for h in config.hosts},
            "hosts": list(cluster.hosts.values()),
            "profiles": {name: request_of(p) for name, p in config.profiles.items()}}
