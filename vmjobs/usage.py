"""Usage accounting: the lab's "load average" and per-user figures, from the store's events.

Pure functions over job histories (no I/O, no clock): `Store.usage_histories` reads them,
`vmjob usage` and `GET /v1/usage` print what these functions compute.

Every event in the store carries what its job held right after it (`events.held`, a copy of
the job's allocation; `None` when it held nothing). A job therefore holds, from one event to
the next (or to `now`), what the earlier event says — except that an event into a finished
state ends the hold at once (the cores of a guest that powered itself off are freed ~1 s
later without an event of their own; that second is not counted). This covers jobs the
daemon runs and direct `vmjob run`s alike: both write the same store.

Units: times are Unix seconds (float), durations seconds, cores are host cpus (a job with
`--threads isolate` also holds its idle SMT siblings), "load" is held core-seconds divided
by usable core-seconds (0.0 .. 1.0), core-hours are held core-seconds / 3600.

Groupings: by host, NUMA node, pool (the cores of its member hosts; a host in two pools
counts in both), profile (the jobs started with `--profile NAME`, over the cores of the hosts
that profile can use) and user.

"Could start" (per profile, per window W): the fraction of the last W seconds during which
one more job of the profile would have been placed somewhere. It is computed exactly, not by
sampling: what every job held is replayed event by event (the cluster's holdings only change
at events, so between two events the answer is constant) on the hosts as inventoried now,
all taken as up, and at each change the engine is asked whether the profile's request fits
(`placement.Cluster.place_within`, the scheduler's "pack" policy). A hold that no longer fits
today's inventory (changed hardware) is left out of the replay.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import placement
from placement import Allocation, HostUsage, Request
from placement.capacity import could_start
from vmjobs.jobs import FINISHED, JobState

# The load-average windows, as `uptime` has its 1, 5 and 15 minutes: (label, seconds)
WINDOWS: tuple[tuple[str, float], ...] = (("1m", 60.0), ("1h", 3600.0), ("24h", 86400.0))


@dataclass(frozen=True)
class Holding:
    """What a job holds on one host: cpus per NUMA node, as ((node, cpus), ...)."""

    host: str
    cpus_by_node: tuple[tuple[int, int], ...]
    # the whole allocation, for replaying who held what (could-start figures); not compared
    allocation: Allocation | None = field(default=None, compare=False)

    @property
    def cpus(self) -> int:
        return sum(n for _node, n in self.cpus_by_node)

    @classmethod
    def from_allocation(cls, data: Mapping[str, Any]) -> Holding:
        """From a stored allocation (`codec.allocation_to_dict`). Idle SMT siblings
        (`idle_cpus`, --threads isolate) are held too; their node is not recorded, so they
        are counted under the allocation's first node (they sit on the same cores as the
        job's cpus, hence on its nodes)."""
        counts: dict[int, int] = {}
        for share in data.get("nodes") or ():
            counts[int(share["node"])] = counts.get(int(share["node"]), 0) + len(share["cpus"])
        idle = len(data.get("idle_cpus") or ())
        if idle:
            first = next(iter(counts), 0)
            counts[first] = counts.get(first, 0) + idle
        from vmjobs.codec import allocation_from_dict

        try:
            allocation: Allocation | None = allocation_from_dict(dict(data))
        except (KeyError, TypeError, ValueError):
            allocation = None  # an event written before allocations were complete
        return cls(str(data["host"]), tuple(sorted(counts.items())), allocation)


@dataclass(frozen=True)
class Mark:
    """One event of a job: when, the state it left the job in (notes repeat the state), and
    what the job held after it."""

    time: float
    state: JobState
    held: Holding | None
    note: bool = False


@dataclass(frozen=True)
class JobHistory:
    """A job's events in order, with its owner and submission time (Unix s)."""

    job_id: str
    owner: str
    submitted: float
    marks: tuple[Mark, ...]
    profile: str | None = None  # the hardware profile it was submitted with


@dataclass(frozen=True)
class Interval:
    """`holding` held from `start` to `end` (Unix s)."""

    job_id: str
    owner: str
    start: float
    end: float
    holding: Holding
    profile: str | None = None


@dataclass(frozen=True)
class LoadRow:
    """One host (node None) or one NUMA node: usable cores now, cores held now, and held /
    usable averaged over each window (label -> 0.0..1.0; None when the window reaches back
    before `since` or the usable cores are not known, e.g. the host is down)."""

    host: str
    node: int | None
    usable_cores: int | None
    held_now: int
    load: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "node": self.node, "usable_cores": self.usable_cores,
                "held_now": self.held_now, "load": dict(self.load)}


@dataclass(frozen=True)
class UserRow:
    """One user over [since, now]: jobs that held cores in it, their core-hours in it, and
    the queue wait (submit -> first start, s) of the jobs that started in it: mean and p95
    (None when none started)."""

    user: str
    jobs: int
    core_hours: float
    started: int
    wait_mean_s: float | None
    wait_p95_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "jobs": self.jobs, "core_hours": self.core_hours,
                "started": self.started, "wait_mean_s": self.wait_mean_s,
                "wait_p95_s": self.wait_p95_s}


def intervals(histories: Iterable[JobHistory], now: float) -> Iterator[Interval]:
    """Every span in which a job held something, clipped to `now`. A finished state ends the
    hold whatever its event says (see the module's docstring)."""
    for history in histories:
        marks = history.marks
        for i, mark in enumerate(marks):
            if mark.held is None or mark.state in FINISHED:
                continue
            end = marks[i + 1].time if i + 1 < len(marks) else now
            end = min(end, now)
            if end > mark.time:
                yield Interval(history.job_id, history.owner, mark.time, end, mark.held,
                               history.profile)


def _overlap(interval: Interval, start: float, end: float) -> float:
    return max(0.0, min(interval.end, end) - max(interval.start, start))


def load_rows(histories: Sequence[JobHistory], capacity: Mapping[str, Mapping[int, int]],
              now: float, since: float, by_node: bool = False) -> list[LoadRow]:
    """The load average per host (or per host and NUMA node with `by_node`).

    `capacity`: host -> {node: usable cores} (what jobs may be given: the host's cpus minus
    its `reserved_cpus`), as known now; a host that held jobs but is missing there gets a row
    with unknown capacity. A window longer than `now - since` is None: the events read do
    not reach back that far. Rows are sorted by host, then node."""
    spans = list(intervals(histories, now))
    held: dict[tuple[str, int | None], list[tuple[Interval, int]]] = defaultdict(list)
    for span in spans:
        if by_node:
            for node, cpus in span.holding.cpus_by_node:
                held[(span.holding.host, node)].append((span, cpus))
        else:
            held[(span.holding.host, None)].append((span, span.holding.cpus))
    keys: set[tuple[str, int | None]] = set(held)
    for host, nodes in capacity.items():
        keys.update(((host, node) for node in nodes) if by_node else [(host, None)])
    rows = []
    for host, node in sorted(keys, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        nodes = capacity.get(host)
        usable = None if nodes is None else (nodes.get(node) if by_node and node is not None
                                              else sum(nodes.values()))
        pieces = held.get((host, node), [])
        held_now = sum(cpus for span, cpus in pieces if span.end >= now)  # open at `now`
        rows.append(LoadRow(host, node, usable, held_now,
                            _window_loads(pieces, usable, now, since)))
    return rows


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (the smallest value with at least `fraction` of the values
    at or below it; Hyndman & Fan's definition 1, as `sreport` and most monitoring use).
    ValueError on an empty sequence."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def first_start(history: JobHistory) -> float | None:
    """When the job's guest first ran (its first RUNNING event that is not a note)."""
    return next((m.time for m in history.marks
                 if m.state == JobState.RUNNING and not m.note), None)


def user_rows(histories: Sequence[JobHistory], now: float, since: float) -> list[UserRow]:
    """Per user (sorted by name), over [since, now]: jobs that held cores, core-hours held,
    and the waits of the jobs that first started in it."""
    core_s: dict[str, float] = defaultdict(float)
    jobs: dict[str, set[str]] = defaultdict(set)
    for span in intervals(histories, now):
        seconds = _overlap(span, since, now)
        if seconds > 0:
            core_s[span.owner] += span.holding.cpus * seconds
            jobs[span.owner].add(span.job_id)
    waits: dict[str, list[float]] = defaultdict(list)
    for history in histories:
        started = first_start(history)
        if started is not None and since <= started <= now:
            waits[history.owner].append(max(0.0, started - history.submitted))
    rows = []
    for user in sorted(set(jobs) | set(waits)):
        w = waits.get(user, [])
        rows.append(UserRow(user, len(jobs.get(user, ())), core_s.get(user, 0.0) / 3600.0,
                            len(w), sum(w) / len(w) if w else None,
                            nearest_rank(w, 0.95) if w else None))
    return rows


@dataclass(frozen=True)
class GroupRow:
    """One pool or profile: its usable cores (None: not known), the cores its jobs hold now,
    the load per window (as `LoadRow`), how many jobs held cores in [since, now], and for a
    profile the could-start fraction per window (see the module's docstring)."""

    kind: str  # "pool" or "profile"
    name: str
    hosts: tuple[str, ...]
    usable_cores: int | None
    held_now: int
    jobs: int
    load: dict[str, float | None]
    could_start: dict[str, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {self.kind: self.name, "hosts": list(self.hosts),
                "usable_cores": self.usable_cores, "held_now": self.held_now,
                "jobs": self.jobs, "load": dict(self.load)}
        if self.kind == "profile":
            data["could_start"] = self.could_start
        return data


def _window_loads(pieces: Sequence[tuple[Interval, int]], usable: int | None, now: float,
                  since: float) -> dict[str, float | None]:
    load: dict[str, float | None] = {}
    for label, seconds in WINDOWS:
        if seconds > now - since + 1e-9 or not usable:
            load[label] = None
            continue
        core_s = sum(cpus * _overlap(span, now - seconds, now) for span, cpus in pieces)
        load[label] = core_s / (usable * seconds)
    return load


def _group_row(kind: str, name: str, hosts: Sequence[str], usable: int | None,
               spans: Sequence[Interval], now: float, since: float) -> GroupRow:
    pieces = [(span, span.holding.cpus) for span in spans]
    return GroupRow(kind, name, tuple(hosts), usable,
                    sum(cpus for span, cpus in pieces if span.end >= now),
                    len({span.job_id for span in spans if _overlap(span, since, now) > 0}),
                    _window_loads(pieces, usable, now, since))


def pool_rows(histories: Sequence[JobHistory], capacity: Mapping[str, Mapping[int, int]],
              pools: Mapping[str, Sequence[str]], now: float, since: float) -> list[GroupRow]:
    """The load average per pool (sorted by name): cores held on its member hosts over their
    usable cores. `pools`: host -> the pools it belongs to (a host in two pools counts in
    both); a member missing from `capacity` (down) makes the pool's capacity unknown."""
    members: dict[str, list[str]] = defaultdict(list)
    for host, names in pools.items():
        for pool in names:
            members[pool].append(host)
    spans = list(intervals(histories, now))
    rows = []
    for pool in sorted(members):
        hosts = sorted(members[pool])
        usable = None if any(h not in capacity for h in hosts) else \
            sum(sum(capacity[h].values()) for h in hosts)
        rows.append(_group_row("pool", pool, hosts, usable,
                               [s for s in spans if s.holding.host in hosts], now, since))
    return rows


def could_start_fractions(histories: Sequence[JobHistory], hosts: Sequence[placement.Host],
                          request: Request, now: float, since: float
                          ) -> dict[str, float | None]:
    """Per window, the fraction of it during which one more job of `request` would have been
    placed somewhere (see the module's docstring); None for a window reaching back before
    `since`. `hosts`: the inventory, taken as up. O(events x one placement)."""
    usable = [label for label, seconds in WINDOWS if seconds <= now - since + 1e-9]
    result: dict[str, float | None] = {label: None for label, _ in WINDOWS}
    if not usable:
        return result
    start = now - max(seconds for label, seconds in WINDOWS if label in usable)
    cluster = _all_up(hosts)
    spans = [s for s in intervals(histories, now)
             if s.end > start and s.holding.allocation is not None
             and s.holding.host in cluster.hosts]
    # change points: at each, releases first (a job ending frees room for one starting)
    changes: list[tuple[float, int, int]] = []
    for i, span in enumerate(spans):
        changes.append((max(span.start, start), 1, i))
        if span.end < now:
            changes.append((span.end, 0, i))
    changes.sort()
    held: set[int] = set()
    fits_from: list[tuple[float, bool]] = []  # (time, fits from then on)
    k = 0
    moments = sorted({start, *(t for t, _, _ in changes)})
    for moment in moments:
        while k < len(changes) and changes[k][0] <= moment:
            _, kind, i = changes[k]
            k += 1
            key = f"\0usage-{i}"
            if kind == 0 and i in held:
                cluster.release(key)
                held.discard(i)
            elif kind == 1:
                allocation = spans[i].holding.allocation
                assert allocation is not None
                try:
                    cluster.reserve(key, allocation)
                    held.add(i)
                except placement.Conflict:
                    pass  # does not fit today's inventory: left out (module docstring)
        fits_from.append((moment, could_start(cluster, request)))
    for label, seconds in WINDOWS:
        if label not in usable:
            continue
        begin, total = now - seconds, 0.0
        for j, (moment, fits) in enumerate(fits_from):
            end = fits_from[j + 1][0] if j + 1 < len(fits_from) else now
            if fits:
                total += max(0.0, min(end, now) - max(moment, begin))
        result[label] = total / seconds
    return result


def _all_up(hosts: Sequence[placement.Host]) -> placement.Cluster:
    """An empty cluster of `hosts`, every one up (history does not say when one was down)."""
    return placement.Cluster([replace(h, state=placement.HostState.UP) for h in hosts])


def profile_rows(histories: Sequence[JobHistory], hosts: Sequence[placement.Host],
                 profiles: Mapping[str, Request], now: float, since: float) -> list[GroupRow]:
    """Per profile (configured ones in their order, then ones only the history names): the
    cores its jobs held over the usable cores of the hosts it can use (those where it fits
    when empty), its jobs, and the could-start fractions (None for a profile no longer
    configured)."""
    spans = list(intervals(histories, now))
    empty = _all_up(hosts)
    names = list(profiles) + sorted({s.profile for s in spans if s.profile is not None
                                     and s.profile not in profiles})
    rows = []
    for name in names:
        mine = [s for s in spans if s.profile == name]
        request = profiles.get(name)
        if request is None:
            rows.append(_group_row("profile", name, (), None, mine, now, since))
            continue
        able = [h.name for h in hosts
                if empty.place_within(replace(request, host=h.name)).allocation is not None]
        usable = sum(empty.free(name).cpus_total for name in able)  # reserved_cpus left out
        row = _group_row("profile", name, able, usable, mine, now, since)
        rows.append(replace(row, could_start=could_start_fractions(
            histories, hosts, request, now, since)))
    return rows


GROUPINGS = ("host", "node", "pool", "profile", "user")
DEFAULT_SINCE_S = 86400.0
MAX_SINCE_S = 366 * 86400.0  # a year: the query stays bounded


def capacity_of(usages: Iterable[HostUsage]) -> dict[str, dict[int, int]]:
    """host -> {node: usable cores} from the engine's view of reachable hosts (`cpus_total`
    excludes the config's `reserved_cpus`)."""
    return {u.host: {n.node: n.cpus_total for n in u.nodes} for u in usages}


def report(histories: Sequence[JobHistory], capacity: Mapping[str, Mapping[int, int]],
           now: float, since: float, by: str, user: str | None = None, *,
           pools: Mapping[str, Sequence[str]] | None = None,
           hosts: Sequence[placement.Host] = (),
           profiles: Mapping[str, Request] | None = None) -> dict[str, Any]:
    """What `vmjob usage --json` and `GET /v1/usage` answer: {"by", "now", "since" (Unix s),
    "windows": {label: seconds}, "rows": [...]} with rows of `LoadRow.to_dict` (by host or
    node), `GroupRow.to_dict` (by pool: needs `pools`, host -> its pools; by profile: needs
    `hosts`, the inventory, and `profiles`, name -> request) or `UserRow.to_dict` (by user;
    only `user`'s row when `user` is given, as a non-admin sees it). ValueError for a
    grouping not in GROUPINGS."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: list[dict[str, Any]]
    if by == "user":
        rows = [r.to_dict() for r in user_rows(histories, now, since)
                if user is None or r.user == user]
    elif by == "pool":
        rows = [r.to_dict() for r in pool_rows(histories, capacity, pools or {}, now, since)]
    elif by == "profile":
        rows = [r.to_dict() for r in profile_rows(histories, hosts, profiles or {}, now, since)]
    else:
        rows = [r.to_dict() for r in load_rows(histories, capacity, now, since,
                                               by_node=by == "node")]
    return {"by": by, "now": now, "since": since, "windows": dict(WINDOWS), "rows": rows}
