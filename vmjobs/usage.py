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
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from placement import HostUsage
from vmjobs.jobs import FINISHED, JobState

# The load-average windows, as `uptime` has its 1, 5 and 15 minutes: (label, seconds)
WINDOWS: tuple[tuple[str, float], ...] = (("1m", 60.0), ("1h", 3600.0), ("24h", 86400.0))


@dataclass(frozen=True)
class Holding:
    """What a job holds on one host: cpus per NUMA node, as ((node, cpus), ...)."""

    host: str
    cpus_by_node: tuple[tuple[int, int], ...]

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
        return cls(str(data["host"]), tuple(sorted(counts.items())))


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


@dataclass(frozen=True)
class Interval:
    """`holding` held from `start` to `end` (Unix s)."""

    job_id: str
    owner: str
    start: float
    end: float
    holding: Holding


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
                yield Interval(history.job_id, history.owner, mark.time, end, mark.held)


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
        load: dict[str, float | None] = {}
        for label, seconds in WINDOWS:
            if seconds > now - since + 1e-9 or not usable:
                load[label] = None
                continue
            core_s = sum(cpus * _overlap(span, now - seconds, now) for span, cpus in pieces)
            load[label] = core_s / (usable * seconds)
        rows.append(LoadRow(host, node, usable, held_now, load))
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


GROUPINGS = ("host", "node", "user")  # pool and profile come with pools and profiles
DEFAULT_SINCE_S = 86400.0
MAX_SINCE_S = 366 * 86400.0  # a year: the query stays bounded


def capacity_of(usages: Iterable[HostUsage]) -> dict[str, dict[int, int]]:
    """host -> {node: usable cores} from the engine's view of reachable hosts (`cpus_total`
    excludes the config's `reserved_cpus`)."""
    return {u.host: {n.node: n.cpus_total for n in u.nodes} for u in usages}


def report(histories: Sequence[JobHistory], capacity: Mapping[str, Mapping[int, int]],
           now: float, since: float, by: str, user: str | None = None) -> dict[str, Any]:
    """What `vmjob usage --json` and `GET /v1/usage` answer: {"by", "now", "since" (Unix s),
    "windows": {label: seconds}, "rows": [...]} with rows of `LoadRow.to_dict` (by host or
    node) or `UserRow.to_dict` (by user; only `user`'s row when `user` is given, as a
    non-admin sees it). ValueError for a grouping not in GROUPINGS."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: list[dict[str, Any]]
    if by == "user":
        rows = [r.to_dict() for r in user_rows(histories, now, since)
                if user is None or r.user == user]
    else:
        rows = [r.to_dict() for r in load_rows(histories, capacity, now, since,
                                               by_node=by == "node")]
    return {"by": by, "now": now, "since": since, "windows": dict(WINDOWS), "rows": rows}
