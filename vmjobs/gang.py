"""Gangs: one submission of N guests placed together, all or none (`--nodes N`, YAML `nodes:`).

A gang has an id of its own (`new_job_id()`) and no row of its own: its members are ordinary
jobs `GANG.0 .. GANG.N-1`, queued in one transaction, each with its own spec (its program and
shape) plus its place in the gang (`KEY_*` below, in the stored spec). Everything a job has —
launch, collect, logs, moves, recovery from the domains' metadata — a member has as it is. What
makes them a gang:

- the queue gathers the queued members into one entry placed all or none
  (`daemon.queue.group_gangs`, `placement.gang.place_gang`), inside the scheduler's one store
  transaction;
- members kept apart carry an anti-affinity group in their stored request
  (`placement.gang.apart_groups`), so every later placement (a migration, a restore) keeps
  them apart too;
- the end of one member can end the others (`on_member_failure: stop`, `member_failed`);
- `show`, `wait`, `list`, `cancel` take the gang's id (`GangView`), `logs`/`show`/`wait`/
  `cancel` a member's.

`Member`, `members(store, gang_id)` and `gang_of` are how the rest of vmjobs asks "which gang is
this job in, and its members"; `GangHooks` is where code plugs in around a gang's start and end
(docs/architecture.md, "Gangs").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmjobs.jobs import JobRecord, JobState

if TYPE_CHECKING:
    from vmjobs.store import Store

MAX_NODES = 256  # members of one gang; far above a CI job, bounds one submit's rows
ENV_NODE, ENV_NODES = "VMJOB_NODE", "VMJOB_NODES"
# keys of a member's stored spec
KEY_ID, KEY_INDEX, KEY_SIZE = "gang_id", "gang_index", "gang_size"
KEY_ON_FAILURE = "gang_on_failure"  # "stop" | "continue"
KEY_STOPPED_BY = "gang_stopped_by"  # set on a member the gang stopped: the member that failed
ON_FAILURE = ("stop", "continue")
# how a member's failure is recognised: an end that is not a completed exit 0
_FAILED = frozenset({JobState.FAILED, JobState.TIMEOUT, JobState.LOST, JobState.EXPIRED,
                     JobState.CANCELLED})


def member_id(gang_id: str, index: int) -> str:
    return f"{gang_id}.{index}"


def split_member_id(job_id: str) -> tuple[str, int] | None:
    """`GANG.i` -> (GANG, i); None for an id that is not a member's."""
    gang, dot, index = job_id.rpartition(".")
    if not dot or not gang or not index.isdigit():
        return None
    return gang, int(index)


def member_spec(spec: Mapping[str, Any], gang_id: str, index: int, size: int,
                on_failure: str) -> dict[str, Any]:
    """A member's stored spec: its own spec with its place in the gang."""
    return {**spec, KEY_ID: gang_id, KEY_INDEX: index, KEY_SIZE: size,
            KEY_ON_FAILURE: on_failure}


@dataclass(frozen=True)
class GangRef:
    """A job's place in its gang, read from its stored spec."""

    gang_id: str
    index: int
    size: int
    on_failure: str = "stop"


def gang_of(spec: Mapping[str, Any]) -> GangRef | None:
    """The gang a stored spec's job belongs to, or None for a job of no gang."""
    gang_id, index, size = spec.get(KEY_ID), spec.get(KEY_INDEX), spec.get(KEY_SIZE)
    if not isinstance(gang_id, str) or not isinstance(index, int) or not isinstance(size, int):
        return None
    on_failure = spec.get(KEY_ON_FAILURE)
    return GangRef(gang_id, index, size, on_failure if on_failure in ON_FAILURE else "stop")


def gang_env(spec: Mapping[str, Any]) -> dict[str, str]:
    """What a member adds to its guest's environment: `$VMJOB_NODE` (its index) and
    `$VMJOB_NODES` (the gang's size); nothing for a job of no gang."""
    ref = gang_of(spec)
    if ref is None:
        return {}
    return {ENV_NODE: str(ref.index), ENV_NODES: str(ref.size)}


@dataclass(frozen=True)
class Member:
    """One member of a gang as the rest of vmjobs sees it."""

    index: int
    job_id: str  # GANG.index
    host: str | None  # where it holds its reservation now (None: queued, ended)
    state: JobState
    exit_code: int | None
    message: str | None
    stopped_by: str | None = None  # the member whose failure made the gang stop this one


def as_member(record: JobRecord) -> Member:
    ref = gang_of(record.spec)
    assert ref is not None, f"{record.id} is not a gang member"
    stopped = record.spec.get(KEY_STOPPED_BY)
    return Member(ref.index, record.id, record.host, record.state, record.exit_code,
                  record.message, stopped if isinstance(stopped, str) else None)


def member_records(store: Store, gang_id: str) -> list[JobRecord]:
    """The member jobs of `gang_id`, by index (one primary-key range: `GANG.` .. `GANG/`)."""
    return sorted((r for r in store.id_range(f"{gang_id}.", f"{gang_id}/")
                   if (ref := gang_of(r.spec)) is not None and ref.gang_id == gang_id),
                  key=lambda r: r.spec[KEY_INDEX])


def members(store: Store, gang_id: str) -> list[Member]:
    """The members of `gang_id` (index, job id, host, state, exit code), by index; [] for an
    id that is no gang's."""
    return [as_member(r) for r in member_records(store, gang_id)]


def is_failure(state: JobState, exit_code: int | None) -> bool:
    """A member's end that counts as a failure of the gang: a non-zero exit, or an end with
    no exit status (lost host, time limit, failed, cancelled)."""
    if state == JobState.COMPLETED:
        return exit_code not in (0, None)
    return state in _FAILED or (exit_code is not None and exit_code != 0)


@dataclass(frozen=True)
class Outcome:
    """How a gang stands: `state` as one job's would read, `exit_code` (None until it ends),
    `failed`: the member that decided a failure."""

    state: JobState
    finished: bool
    exit_code: int | None
    failed: Member | None
    message: str | None


_RANK = [JobState.RUNNING, JobState.MIGRATING, JobState.CHECKPOINTING, JobState.RESTORING,
         JobState.UNREACHABLE, JobState.STARTING, JobState.PLACED, JobState.CHECKPOINTED,
         JobState.QUEUED]


def outcome(gang: Sequence[Member], ended_at: Mapping[str, float] | None = None) -> Outcome:
    """The gang's state and exit code from its members'.

    Exit code rule: the code of the first member to fail (by the time of its end, `ended_at`:
    job id -> time, else by index), members the gang stopped because of it (or that failed on
    its poison first, `stopped_by`) not counted unless it did not fail after all; 0 when
    every member completed with 0. Until all members ended the gang is unfinished and its
    state is the most advanced of its unfinished members' (RUNNING if any runs)."""
    unfinished = [m for m in gang if not m.state.finished]
    if unfinished:
        state = min((m.state for m in unfinished),
                    key=lambda s: _RANK.index(s) if s in _RANK else len(_RANK))
        return Outcome(state, False, None, None, None)
    times = ended_at or {}
    # a member stopped by (or failing because of) another counts only if that one failed:
    # a guest that said its job failed and then completed cannot hide its peers' failures
    failed = {m.job_id for m in gang if is_failure(m.state, m.exit_code)}
    failures = sorted((m for m in gang if m.job_id in failed
                       and (m.stopped_by is None or m.stopped_by not in failed)),
                      key=lambda m: (times.get(m.job_id, 0.0), m.index))
    if not failures:
        return Outcome(JobState.COMPLETED, True, 0, None, None)
    first = failures[0]
    message = f"member {first.job_id} {first.state.value}" + (
        f" (exit {first.exit_code})" if first.exit_code is not None else "") + (
        f": {first.message}" if first.message else "")
    state = first.state if first.state != JobState.COMPLETED else JobState.FAILED
    return Outcome(state, True, first.exit_code, first, message)


@dataclass
class GangHooks:
    """Where code plugs in around a gang (the gang's private network, its control channel).

    `starting(gang_id, members)`: the scheduler has reserved every member (PLACED, hosts known)
    and is about to launch their guests; called once per gang start, under the daemon's lock,
    before any member's launch thread exists — keep it short or hand work to a thread.
    `ended(gang_id, members)`: the last member has ended (every member's end recorded); called
    under the daemon's lock, once. Each is a list of callables, called in order; an exception
    is logged and does not stop the others.
    """

    starting: list[Callable[[str, list[Member]], None]] = field(default_factory=list)
    ended: list[Callable[[str, list[Member]], None]] = field(default_factory=list)
