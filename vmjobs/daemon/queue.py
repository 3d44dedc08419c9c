"""The queue's policy: one FIFO (within priority) per pool, with EASY backfill per head. Pure:
no store, no libvirt.

One pass over a snapshot of the cluster decides which queued jobs start now and, for each one
that waits, why. Every pool has a *line*: the jobs that may use one of its hosts wait in it,
in queue order (priority, then submission). A job asking for a pool (`--pool ci`) is in that
pool's line; any other job is in the line of every pool of the hosts it could ever use (a job
pinned to `--host h1` is in h1's pools' lines; a job free to go anywhere on a cluster whose
hosts are all in `default` is in that one line, as before pools existed).

Jobs start in queue order while they fit. The first job of a line that cannot start is that
line's *head*: from the running jobs' time limits the pass computes its *shadow time*, the
latest moment at which it will fit, and the cluster as it will be then. A later job may
start early (backfill) only if it delays no head whose candidate hosts (those its host, pool
and label constraints admit) include the host it would start on: it ends before that head's
shadow time, or the head, re-placed on the cluster as it will be then, still fits with the
later job still running. So a line behaves as a counting semaphore over its pool's hosts —
its head takes the first member that frees, and no later job, of that line or of another
one sharing a member, takes that member first — and a large head is never starved by a
stream of small jobs. A host in two pools is counted in both: the heads of both lines are
protected on it. The reservation is `placement.backfill`'s, which the trace simulator shares.
On a cluster with one pool this is exactly the single-line EASY policy.

A gang (`--nodes N`, `vmjobs.gang`) waits as one job: its members, queued as separate rows,
are gathered into one entry at the first member's place (`group_gangs`), placed all together
or not at all (`placement.gang.place_gang`), counted whole when it is a head (its shadow time
is when every member fits) and when it backfills (every member admitted by every head whose
hosts it would use, or none; a gang is not re-placed outside a refusing head's hosts). It
waits in the lines of all its members. A gang's wait is returned once, under the gang's id;
`Plan.member_waits` gives it per member.

A job of an array with a limit (`--array 1-100%10`) whose array already runs that many jobs
is *held*: it waits with that reason, is passed over (never a head, never blocking anyone
behind it) and is looked at again in the next pass.

A `--borrow` job (docs/borrowing.md) takes free cores only when they fit it now without
delaying a head, like a backfilled job; when they do not, it is held too (never a head: it
would reserve owners' cores for the lowest class of job and make later jobs wait for it)
and waits for lent cores (`vmjobs.daemon.lending`) or for the next pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import placement
from placement import Allocation, Request
from placement.backfill import Head, Holding, Reservation, reserve_head
from placement.gang import place_gang

__all__ = ["BORROWER_WAITS", "FIRST_IN_LINE", "Holding", "Plan", "Planner", "Start", "Wait",
           "Waiting", "group_gangs", "lines_of", "order", "plan"]


@dataclass(frozen=True)
class Waiting:
    """A queued job, in submission order."""

    job_id: str
    request: Request
    time_limit_s: float | None = None
    array: str | None = None  # the id of its job array, if any
    array_limit: int | None = None  # at most this many of the array running (`%N`)
    gang: str | None = None  # a member of this gang (before `group_gangs`)
    # a whole gang (after `group_gangs`): its queued members (job id, request), by index;
    # `job_id` is then the gang's id and `request` its first member's (for its priority)
    members: tuple[tuple[str, Request], ...] = ()
    borrower: bool = False  # `--borrow`: never a head (see the module's docstring)

    def requests(self) -> tuple[Request, ...]:
        return tuple(r for _, r in self.members) if self.members else (self.request,)

    def units(self) -> tuple[tuple[str, Request], ...]:
        """What is placed: (job id, request) of the job, or of each member of a gang."""
        return self.members or ((self.job_id, self.request),)

    def head(self) -> Head:
        """What a reservation must fit: the request, or every member's of a gang."""
        return self.requests() if self.members else self.request


@dataclass(frozen=True)
class Start:
    job_id: str
    allocation: Allocation
    backfilled: bool = False


@dataclass(frozen=True)
class Wait:
    job_id: str
    position: int  # in its line: 1 = the head, unless `held`
    reason: str
    # by its array's limit, or a borrower that does not fit now: nothing to make room for
    held: bool = False
    line: str | None = None  # the pool whose line `position` counts in
    lines: tuple[tuple[str, int], ...] = ()  # (pool, position) in every line it is in, known


@dataclass(frozen=True)
class Plan:
    starts: tuple[Start, ...]
    waits: tuple[Wait, ...]
    shadow: float | None = None  # when the first head will fit at the latest, when known

    def member_waits(self, gangs: Mapping[str, Sequence[str]]) -> dict[str, Wait]:
        """Every wait by job id, a gang's wait repeated for each of its members (`gangs`: gang
        id -> member ids, as `group_gangs` made them)."""
        out: dict[str, Wait] = {}
        for wait in self.waits:
            for job_id in gangs.get(wait.job_id, (wait.job_id,)):
                out[job_id] = replace(wait, job_id=job_id)
        return out


def order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """Higher priority first; submission order within a priority (sorted() is stable)."""
    return sorted(waiting, key=lambda w: -w.request.priority)


def group_gangs(queue: Sequence[Waiting]) -> list[Waiting]:
    """The queue with each gang's members gathered into one entry at its first member's place
    (members in their order in `queue`, which is index order for members queued together).
    Entries of no gang are kept as they are. O(len(queue))."""
    members: dict[str, list[Waiting]] = {}
    for job in queue:
        if job.gang is not None:
            members.setdefault(job.gang, []).append(job)
    out: list[Waiting] = []
    for job in queue:
        if job.gang is None:
            out.append(job)
        elif job.gang in members:
            group = members.pop(job.gang)
            # the gang holds its hosts until its longest member ends: no limit if one has none
            limits = [m.time_limit_s for m in group if m.time_limit_s is not None]
            limit = max(limits) if len(limits) == len(group) else None
            out.append(Waiting(job.gang, group[0].request, limit,
                               members=tuple((m.job_id, m.request) for m in group)))
    return out


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


Holders = Sequence[Holding] | Callable[[], Sequence[Holding]]


def plan(cluster: placement.Cluster, waiting: Sequence[Waiting], holding: Holders,
         now: float, policy: str = "pack", running: Mapping[str, int] | None = None) -> Plan:
    """Which queued jobs start now, and why each of the others waits. `cluster` is not changed.
    `holding` (who holds what until when) may be given as a function: it is only needed, and
    only called, when some job does not fit. `running`: array id -> how many of its jobs hold
    resources now (for `%N` limits)."""
    return Planner(cluster, holding, policy, running).offer(group_gangs(order(waiting)), now)


class Planner:
    """One scheduling pass, which can be carried on later with jobs added to the queue's end.

    State guarded: a working copy of the cluster with this pass's starts reserved in it, each
    line's head with its reservation once a job of it could not start, the positions handed
    out per line, the reasons of requests refused so far, and how many jobs of each array
    run. If the cluster has not changed since (nothing released, no host up or down),
    offering the jobs submitted meanwhile gives the same decisions as planning the whole
    queue again — the jobs before them are decided the same way, on the same cluster — at
    the cost of the new jobs alone (`offer`). Pure: no store, no clock (`now` is given).

    Positions, per line: its head is 1, then every other job waiting in it, in queue order. A
    job in several lines is reported with its best position (`Wait.line` names that line).
    Jobs held by their array's limit before a line's head is known are numbered after it once
    it is, so an `offer` that finds the head also returns those held jobs again, renumbered.
    """

    def __init__(self, cluster: placement.Cluster, holding: Holders, policy: str = "pack",
                 running: Mapping[str, int] | None = None) -> None:
        self.cluster = cluster.copy()
        self.policy = policy
        self._holding = holding
        self.limits = _ArrayLimits(running or {})
        self.holders: list[Holding] | None = None  # read when the first head is found
        self.pending: list[Holding] = []  # this pass's starts, holders from now on
        self.decided: list[str] = []  # every job offered, in queue order
        self.lines: dict[str, _Line] = {}
        self.heads: list[_Head] = []  # in queue order
        self._scopes: dict[tuple[object, ...], tuple[frozenset[str], tuple[str, ...]]] = {}
        self._positions: dict[str, dict[str, int]] = {}  # waiting job -> line -> position
        self._verdicts: dict[str, Wait] = {}  # waiting job -> why (position set on output)
        # The cluster only fills up during a pass, so a request that did not fit still does
        # not: a long queue of alike jobs costs one placement, not one each.
        self.refused: dict[Head, str] = {}

    @property
    def head(self) -> Waiting | None:
        """The first head found (queue order), if any."""
        return self.heads[0].job if self.heads else None

    def scope(self, request: Request) -> tuple[frozenset[str], tuple[str, ...]]:
        """`lines_of(request)` on this pass's cluster, once per kind of request."""
        key = (request.host, request.pool, request.labels, request.threads)
        found = self._scopes.get(key)
        if found is None:
            found = self._scopes[key] = lines_of(self.cluster, request)
        return found

    def scope_of(self, job: Waiting) -> tuple[frozenset[str], tuple[str, ...]]:
        """`scope` of a queue entry; a gang's: every member's hosts and lines together."""
        if not job.members:
            return self.scope(job.request)
        scopes = [self.scope(r) for r in job.requests()]
        return (frozenset().union(*(h for h, _ in scopes)),
                tuple(sorted({n for _, lines in scopes for n in lines})))

    def offer(self, queue: Sequence[Waiting], now: float) -> Plan:
        """Decide `queue` (in queue order, after every job offered before): the starts and
        waits among them (and held jobs renumbered, see the class)."""
        starts: list[Start] = []
        out: dict[str, Wait] = {}  # a job renumbered in this offer is returned once, last
        for job in queue:
            self.decided.append(job.job_id)
            if (reason := self.limits.holds(job)) is not None:
                self._hold(job, self.scope(job.request)[1], reason, out)
                continue
            tried = self._try_gang(job, now) if job.members else self._try(job, now)
            if isinstance(tried, Start):
                starts.append(tried)
                continue
            if isinstance(tried, list):
                starts.extend(tried)
                continue
            if job.borrower and not job.members:
                self._hold(job, self.scope(job.request)[1], f"{BORROWER_WAITS}; now: {tried}",
                           out)
                continue
            hosts, lines = self.scope_of(job)
            self._verdicts[job.job_id] = Wait(job.job_id, 0, tried)
            positions = self._positions[job.job_id] = {}
            headless = [name for name in lines if self._line(name).head is None]
            if headless:
                head = self._make_head(job, hosts, headless, tried, now)
                for name in headless:
                    line = self.lines[name]
                    line.head, line.count = head, 1
                    positions[name] = 1
            for name in lines:
                if name not in positions:
                    line = self.lines[name]
                    line.count += 1
                    positions[name] = line.count
            self._emit(job.job_id, out)
            for name in headless:  # held before the head: numbered after it
                self._renumber(self.lines[name], out, keep=False)
        for line in self.lines.values():
            if line.head is None and line.held_early:
                line.count = 0
                self._renumber(line, out, keep=True)
        shadow = self.heads[0].reservation.shadow if self.heads else None
        return Plan(tuple(starts), tuple(out.values()), shadow)

    def _line(self, name: str) -> _Line:
        line = self.lines.get(name)
        if line is None:
            line = self.lines[name] = _Line(name)
        return line

    def _try(self, job: Waiting, now: float) -> Start | str:
        """Start `job` if it fits now and delays no head on the host it would take; else
        why not. Where the host the engine picks would delay a head, the job is placed again
        outside that head's hosts (a job free to use another pool's hosts need not wait for
        this one's head)."""
        if job.request in self.refused:
            return self.refused[job.request]
        decision = self.cluster.place(job.request, self.policy)
        allocation = decision.allocation
        if allocation is None:
            reason = self.refused[job.request] = decision.explanation.summary
            return reason
        ends = _ends(job, now)
        excluded: frozenset[str] = frozenset()
        first: _Head | None = None
        while (refusing := self._admit(job, allocation, ends)) is not None:
            first = first or refusing
            excluded |= refusing.hosts
            if self.scope(job.request)[0] <= excluded:
                return _would_delay(job, first)
            allocation = self.cluster.place_within(job.request, self.policy,
                                                   excluded).allocation
            if allocation is None:
                return _would_delay(job, first)
        self.cluster.reserve(job.job_id, allocation, job.request)
        self.pending.append(Holding(job.job_id, ends))
        self.limits.started(job)
        # behind a head of one of its lines (the scope is only worked out once a head exists:
        # while every job fits, a pass costs no more than before pools)
        behind = bool(self.heads) and any(
            self.lines[n].head is not None
            for n in self.scope(job.request)[1] if n in self.lines)
        return Start(job.job_id, allocation, backfilled=behind)

    def _try_gang(self, job: Waiting, now: float) -> list[Start] | str:
        """Start every member of a gang if all fit now together and delay no head on the
        hosts they would take; else why not. Never some members: all or none."""
        key = job.head()
        if key in self.refused:
            return self.refused[key]
        decision = place_gang(self.cluster, job.requests(), self.policy,
                              names=[job_id for job_id, _ in job.members])
        if decision.allocations is None:
            reason = self.refused[key] = f"gang of {len(job.members)}: {decision.reason}"
            return reason
        ends = _ends(job, now)
        units = [(job_id, allocation, request) for (job_id, request), allocation
                 in zip(job.units(), decision.allocations, strict=True)]
        used = {allocation.host for _, allocation, _ in units}
        admitted: list[_Head] = []
        for head in self.heads:
            if not used & head.hosts:
                continue  # that head can never use these hosts: nothing to delay
            if not head.reservation.admits_all(units, ends):
                for other in admitted:
                    for job_id, _, _ in units:
                        other.reservation.withdraw(job_id)
                return _would_delay(job, head)
            admitted.append(head)
        starts = []
        behind = bool(self.heads) and any(
            self.lines[n].head is not None for n in self.scope_of(job)[1] if n in self.lines)
        for job_id, allocation, request in units:
            self.cluster.reserve(job_id, allocation, request)
            self.pending.append(Holding(job_id, ends))
            starts.append(Start(job_id, allocation, backfilled=behind))
        self.limits.started(job)
        return starts

    def _admit(self, job: Waiting, allocation: Allocation, ends: float | None) -> _Head | None:
        """None if every head that could use `allocation`'s host admits the job there (it
        stays held in their projected clusters); else the first head that refuses (and the
        admissions made are withdrawn)."""
        admitted: list[_Head] = []
        for head in self.heads:
            if allocation.host not in head.hosts:
                continue  # that head can never use the host: nothing to delay
            if not head.reservation.admits(job.job_id, allocation, job.request, ends):
                for other in admitted:
                    other.reservation.withdraw(job.job_id)
                return head
            admitted.append(head)
        return None

    def _make_head(self, job: Waiting, hosts: frozenset[str], lines: list[str], why: str,
                   now: float) -> _Head:
        if self.holders is None:
            self.holders = list(self._holding() if callable(self._holding) else self._holding)
        reservation = reserve_head(self.cluster, job.head(), [*self.holders, *self.pending],
                                   now, self.policy)
        head = _Head(job, reservation, hosts, tuple(lines))
        self.heads.append(head)
        if why == self.refused.get(job.head()):  # it does not fit: say what it waits for
            if not job.members:  # (a gang's reason names the member that does not fit)
                why = self.cluster.explain(job.request).summary
            if reservation.shadow is not None:
                why += f"; starts by {_clock(reservation.shadow)} at the latest"
        self._verdicts[job.job_id] = Wait(job.job_id, 0, f"{_first_in(lines)}: {why}")
        return head

    def _hold(self, job: Waiting, lines: tuple[str, ...], reason: str,
              out: dict[str, Wait]) -> None:
        self._verdicts[job.job_id] = Wait(job.job_id, 0, reason, held=True)
        positions = self._positions[job.job_id] = {}
        for name in lines:
            line = self._line(name)
            if line.head is None:
                line.held_early.append(job.job_id)
            else:
                line.count += 1
                positions[name] = line.count
        if positions:
            self._emit(job.job_id, out)

    def _renumber(self, line: _Line, out: dict[str, Wait], keep: bool) -> None:
        for job_id in line.held_early:
            line.count += 1
            self._positions[job_id][line.name] = line.count
            self._emit(job_id, out)
        if not keep:
            line.held_early = []

    def _emit(self, job_id: str, out: dict[str, Wait]) -> None:
        position, line = min((p, name) for name, p in self._positions[job_id].items())
        out[job_id] = replace(self._verdicts[job_id], position=position, line=line,
                              lines=tuple(sorted(self._positions[job_id].items())))


@dataclass
class _Line:
    """One pool's line in a pass: its head, the positions handed out, and the jobs held by
    their array's limit before a head was known."""

    name: str
    head: _Head | None = None
    count: int = 0
    held_early: list[str] = field(default_factory=list)


@dataclass
class _Head:
    """A line's head: the job, its EASY reservation, and the hosts it could ever use (a
    later job starting elsewhere cannot delay it)."""

    job: Waiting
    reservation: Reservation
    hosts: frozenset[str]
    lines: tuple[str, ...]  # the lines it heads


# why a --borrow job that does not fit now waits (followed by why it does not fit)
BORROWER_WAITS = ("--borrow: waits for lent cores, or for free ones that no job first in "
                  "line needs; never first in line")

# the prefix of a head's reason, for those who print the reason alone (a direct `vmjob run`)
FIRST_IN_LINE = re.compile(r"^first in line(?: for pools? [^:]+)?: ")


def lines_of(cluster: placement.Cluster,
             request: Request) -> tuple[frozenset[str], tuple[str, ...]]:
    """The hosts `request` could ever use (its host, pool, label and thread constraints; see
    `Cluster.candidates`) and the lines it waits in, sorted: its `--pool`, else every pool of
    those hosts (of all hosts if none could serve it; `default` on an empty cluster)."""
    hosts = cluster.candidates(request)
    if request.pool is not None:
        return frozenset(hosts), (request.pool,)
    if not hosts or len(hosts) == len(cluster.hosts):
        return frozenset(hosts), cluster.pools or ("default",)
    known = cluster.hosts
    return frozenset(hosts), tuple(sorted({p for h in hosts for p in known[h].pools}))


def _first_in(lines: Sequence[str]) -> str:
    """"first in line" (the one pool is `default`), "first in line for pool ci", ..."""
    if list(lines) == ["default"]:
        return "first in line"
    return f"first in line for pool{'s' if len(lines) > 1 else ''} {', '.join(lines)}"


class _ArrayLimits:
    """How many jobs of each array run, counting those this pass starts."""

    def __init__(self, running: Mapping[str, int]) -> None:
        self.running = dict(running)

    def holds(self, job: Waiting) -> str | None:
        """Why `job` must wait for its array's limit, or None if it may start."""
        if job.array is None or job.array_limit is None:
            return None
        count = self.running.get(job.array, 0)
        if count < job.array_limit:
            return None
        return (f"held by its array's limit: {count} of array {job.array} running, "
                f"at most {job.array_limit} at once (%{job.array_limit})")

    def started(self, job: Waiting) -> None:
        if job.array is not None:
            self.running[job.array] = self.running.get(job.array, 0) + 1


def _ends(job: Waiting, now: float) -> float | None:
    return now + job.time_limit_s if job.time_limit_s is not None else None


def _would_delay(job: Waiting, head: _Head) -> str:
    """Why `job` must not start where it fits now: it would delay `head`."""
    reservation = head.reservation
    first = _first_in(head.lines)
    if reservation.shadow is None:
        return (f"room now, but it would delay {head.job.job_id} ({first}), whose start "
                "depends on jobs without a time limit")
    limit = "" if job.time_limit_s is not None else "; a --time-limit would let it start early"
    return (f"room now, but it would delay {head.job.job_id} ({first}, due by "
            f"{_clock(reservation.shadow)}){limit}")
