"""`vmjob list`'s selection and columns: plain functions over the API's job views.

The filters follow squeue's (`--user`, `--state`, comma lists, OR within one filter, AND
across filters); the columns are named for `-o/--format` (as kubectl's `-o
custom-columns`, squeue's `--Format`). Times: AGE is counted from a job's submission while it
has not ended and from its end once it has (an old job that ended a minute ago is "1m");
ELAPSED is running time, [D-]HH:MM:SS as squeue prints it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmjobs.errors import UsageError
from vmjobs.jobs import JobState
from vmjobs.units import format_clock, format_mib

View = dict[str, Any]


@dataclass(frozen=True)
class Filters:
    """Each set empty = no filter on that field. `names` are shell patterns (`sweep-*`)."""

    users: frozenset[str] = frozenset()
    states: frozenset[JobState] = frozenset()
    hosts: frozenset[str] = frozenset()
    pools: frozenset[str] = frozenset()
    names: tuple[str, ...] = ()

    @property
    def wants_ended(self) -> bool:
        """A state filter naming an ended state asks for ended jobs (no --all needed)."""
        return any(s.finished for s in self.states)


def comma_list(values: Sequence[str]) -> list[str]:
    """Repeated options and comma lists alike: ('a,b', 'c') -> ['a', 'b', 'c']."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_states(values: Sequence[str]) -> frozenset[JobState]:
    """'running,queued' -> {RUNNING, QUEUED} (any case). Raises UsageError naming the known
    states for an unknown one."""
    states = set()
    for item in comma_list(values):
        try:
            states.add(JobState(item.upper()))
        except ValueError:
            raise UsageError(f"--state {item!r} is not a job state (one of "
                             f"{', '.join(s.value for s in JobState)})") from None
    return frozenset(states)


def matches(view: View, filters: Filters) -> bool:
    request = view.get("request") or {}
    return ((not filters.users or view.get("owner") in filters.users)
            and (not filters.states or view.get("state") in filters.states)
            and (not filters.hosts or (view.get("host") or request.get("host"))
                 in filters.hosts)
            and (not filters.pools or request.get("pool") in filters.pools)
            and (not filters.names or any(fnmatch.fnmatchcase(view.get("name") or "", p)
                                          for p in filters.names)))


def ended(view: View) -> bool:
    return JobState(view["state"]).finished


def age_seconds(view: View, now: float) -> float:
    """Since submission while the job has not ended, since its end once it has."""
    since = view["updated"] if ended(view) else view["created"]
    return max(now - since, 0.0)


def elapsed_seconds(view: View, now: float) -> float | None:
    """Running time: from its start to its end (or now); None if it never started."""
    started = view.get("started")
    if started is None:
        return None
    return max((view["updated"] if ended(view) else now) - started, 0.0)


def format_age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def place_in_line(view: View) -> str:
    """"position 3", or "position 3 in pool ci" when it waits in a pool's line other than
    the default one."""
    line = view.get("line")
    where = f" in pool {line}" if line and line != "default" else ""
    return f"position {view.get('position') or '-'}{where}"


def why(view: View) -> str:
    if view["state"] == "QUEUED":
        return view.get("waiting_because") or "waiting for the scheduler"
    return view.get("message") or ""


def _request(view: View) -> dict[str, Any]:
    return view.get("request") or {}


def _elapsed(view: View, now: float) -> str:
    seconds = elapsed_seconds(view, now)
    return "-" if seconds is None else format_clock(seconds)


# name -> (header, cell). Documented in docs/user-guide.md ("vmjob list"); keep in step.
COLUMNS: dict[str, tuple[str, Callable[[View, float], str]]] = {
    "id": ("JOB", lambda v, now: v["id"]),
    "name": ("NAME", lambda v, now: v.get("name") or "-"),
    "owner": ("OWNER", lambda v, now: v["owner"]),
    "state": ("STATE", lambda v, now: v["state"]),
    "host": ("HOST", lambda v, now: v.get("host") or "-"),
    "pool": ("POOL", lambda v, now: _request(v).get("pool") or "-"),
    "cpus": ("CPUS", lambda v, now: str(_request(v).get("cpus", "-"))),
    "mem": ("MEM", lambda v, now: format_mib(_request(v).get("memory_mib", 0))),
    "nics": ("NICS", lambda v, now: str(_request(v).get("nics", 0))),
    "priority": ("PRIO", lambda v, now: str(_request(v).get("priority", 0))),
    "age": ("AGE", lambda v, now: format_age(age_seconds(v, now))),
    "elapsed": ("ELAPSED", _elapsed),
    "time_limit": ("TIME_LIMIT", lambda v, now: format_clock(v["time_limit"])
                   if v.get("time_limit") else "-"),
    "exit_code": ("EXIT", lambda v, now: "-" if v.get("exit_code") is None
                  else str(v["exit_code"])),
    "pos": ("POS", lambda v, now: str(v.get("position") or "-")),
    "why": ("WHY", lambda v, now: why(v)),
}
DEFAULT_COLUMNS = ("id", "name", "owner", "state", "host", "cpus", "mem", "age", "elapsed",
                   "time_limit", "pos", "why")


def parse_columns(text: str | None) -> tuple[str, ...]:
    """'-o id,state,elapsed' -> ('id', 'state', 'elapsed'); None -> the default columns.
    Raises UsageError listing the column names for an unknown one."""
    if text is None:
        return DEFAULT_COLUMNS
    names = tuple(item.strip().lower().replace("-", "_") for item in text.split(","))
    unknown = [n for n in names if n not in COLUMNS]
    if unknown or not names:
        raise UsageError(f"-o: unknown column(s) {', '.join(map(repr, unknown))} (columns: "
                         f"{', '.join(COLUMNS)})")
    return names


def rows(views: list[View], columns: Sequence[str], now: float,
         header: bool = True) -> list[tuple[str, ...]]:
    """The table's rows (the header first when asked), cells as text."""
    table = [tuple(COLUMNS[c][0] for c in columns)] if header else []
    table.extend(tuple(COLUMNS[c][1](v, now) for c in columns) for v in views)
    return table


def render(table: list[tuple[str, ...]]) -> list[str]:
    """Aligned lines; the last column is not padded (WHY may be long)."""
    if not table:
        return []
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
                      + [r[-1]]).rstrip() for r in table]
