"""What a job is: its states, the transitions allowed between them, and the record the store
keeps of it.

The state machine is `TRANSITIONS`: the store refuses any change of state not listed there
(`IllegalTransition`, a bug, never a user error). Events that change nothing (a guest found
running at recovery, NICs plugged back, a reservation freed late) are notes
(`Store.note`), not transitions.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "QUEUED"
    PLACED = "PLACED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    # its host does not answer (libvirtd restarting, stalled, or the machine down): the guest
    # may well run on; LOST only once the host stays away for `host_down_after`
    UNREACHABLE = "UNREACHABLE"
    MIGRATING = "MIGRATING"
    CHECKPOINTING = "CHECKPOINTING"
    CHECKPOINTED = "CHECKPOINTED"
    RESTORING = "RESTORING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    LOST = "LOST"
    EXPIRED = "EXPIRED"  # gave up waiting in the queue (--wait-timeout); it never ran
    # a held reservation's own states (`Kind.RESERVATION`; `RESERVATION_TRANSITIONS`)
    HELD = "HELD"  # holds its cores, memory and NICs, with no guest of its own
    RELEASED = "RELEASED"  # given back (release, its client gone, an admin's --force)

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.LOST,
     JobState.EXPIRED, JobState.RELEASED}
)
UNFINISHED = frozenset(JobState) - FINISHED
# States in which a job holds (or is about to hold) a guest on a host.
ACTIVE = frozenset({JobState.PLACED, JobState.STARTING, JobState.RUNNING,
                    JobState.UNREACHABLE})
# States of a job whose guest is being moved (live migration, save, restore).
MOVING = frozenset({JobState.MIGRATING, JobState.CHECKPOINTING, JobState.RESTORING})

_S = JobState
# The states a job is created in: QUEUED (the daemon's queue), PLACED (a direct `vmjob run`,
# a migration's placeholder on its destination).
INITIAL = frozenset({_S.QUEUED, _S.PLACED})
# Every change of state any code path makes, and no other. "ends" are the verdicts a stopped
# guest's job can get (its exit status, a cancel, its time limit).
_ENDS = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.TIMEOUT})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # placed by the scheduler; cancelled or given up (--wait-timeout) while waiting; failed
    # when a scheduling pass raised on it (the scheduler ends that job and goes on)
    _S.QUEUED: frozenset({_S.PLACED, _S.CANCELLED, _S.EXPIRED, _S.FAILED}),
    # launching; failing to launch; host lost; back to the queue at recovery (no guest yet);
    # a restore's new placement, then restoring or (restore refused) checkpointed again
    _S.PLACED: frozenset({_S.STARTING, _S.FAILED, _S.LOST, _S.QUEUED, _S.RESTORING,
                          _S.CHECKPOINTED}),
    # the guest runs; or it ended before its start was recorded (collected at recovery);
    # never started after all (recovery: no console) -> queued again; host not answering at
    # recovery -> unreachable
    _S.STARTING: frozenset({_S.RUNNING, _S.UNREACHABLE, _S.LOST, _S.QUEUED} | _ENDS),
    # moves; its end; its host stops answering; requeued at recovery (no console)
    _S.RUNNING: frozenset({_S.MIGRATING, _S.CHECKPOINTING, _S.UNREACHABLE, _S.LOST, _S.QUEUED}
                          | _ENDS),
    # its host came back (guest running, or stopped and collected) or stayed away too long
    _S.UNREACHABLE: frozenset({_S.RUNNING, _S.LOST, _S.QUEUED} | _ENDS),
    # a move ends with the guest running (here or there), its host not answering, or lost
    _S.MIGRATING: frozenset({_S.RUNNING, _S.UNREACHABLE, _S.LOST}),
    _S.CHECKPOINTING: frozenset({_S.CHECKPOINTED, _S.RUNNING, _S.UNREACHABLE, _S.LOST}),
    _S.RESTORING: frozenset({_S.RUNNING, _S.CHECKPOINTED, _S.UNREACHABLE, _S.LOST}),
    # restored (placed again first); cancelled or out of time while saved
    _S.CHECKPOINTED: frozenset({_S.PLACED, _S.CANCELLED, _S.TIMEOUT}),
    _S.HELD: frozenset(),  # a job is never HELD: reservations only
    **{end: frozenset() for end in FINISHED},
}


class Kind(StrEnum):
    """What a row of the `jobs` table is: a job (a guest runs a command) or a held reservation
    (cores, memory and NICs held without a guest, which jobs then run inside)."""

    JOB = "job"
    RESERVATION = "reservation"


# A reservation's state machine: waits in the queue like a job, then holds what it was placed
# on until it is released (by its owner or key holder, its client's connection closing, an
# admin's --force) or its --duration is over (TIMEOUT); LOST with its host.
RESERVATION_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # placed by the scheduler; withdrawn (client gone, Ctrl+C while waiting); gave up
    # (--wait-timeout); a scheduling pass raised on it
    _S.QUEUED: frozenset({_S.HELD, _S.CANCELLED, _S.EXPIRED, _S.FAILED}),
    _S.HELD: frozenset({_S.RELEASED, _S.TIMEOUT, _S.LOST}),
    **{end: frozenset() for end in FINISHED},
}
RESERVATION_INITIAL = frozenset({_S.QUEUED})


class IllegalTransition(Exception):
    """A change of state not in `TRANSITIONS`: a bug in vmjobs, not a user error (hence not a
    `VmjobsError`, which the CLI prints as one line)."""

    def __init__(self, job_id: str, old: JobState | None, new: JobState) -> None:
        start = old.value if old is not None else "(new)"
        super().__init__(f"job {job_id}: {start} -> {new.value} is not a transition of the "
                         "job state machine")
        self.job_id, self.old, self.new = job_id, old, new


def allowed(old: JobState | None, new: JobState, kind: Kind = Kind.JOB) -> bool:
    """Whether a job (or a reservation, by `kind`) may go from `old` to `new` (`old` None:
    one being created)."""
    if kind == Kind.RESERVATION:
        if old is None:
            return new in RESERVATION_INITIAL
        return new in RESERVATION_TRANSITIONS.get(old, frozenset())
    if old is None:
        return new in INITIAL
    return new in TRANSITIONS[old]


def check_transition(job_id: str, old: JobState | None, new: JobState,
                     kind: Kind = Kind.JOB) -> None:
    """Raise `IllegalTransition` unless `allowed(old, new, kind)`."""
    if not allowed(old, new, kind):
        raise IllegalTransition(job_id, old, new)


def new_reservation_id() -> str:
    """A reservation's id: `r` + random hex, so one is told from a job's id at a glance (a
    job id is hex only) and never taken for an array member (`ARRAY_INDEX`)."""
    return "r" + secrets.token_hex(4)


def new_job_id() -> str:
    # Random rather than sequential: ids stay unique across controllers and wiped stores, so a
    # stale domain or spool directory can never be mistaken for a new job's.
    return secrets.token_hex(4)


def domain_name(job_id: str) -> str:
    return f"vmjob-{job_id}"


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    uid: int
    state: JobState
    spec: dict[str, Any]
    host: str | None = None
    exit_code: int | None = None
    message: str | None = None
    created: float = 0.0
    updated: float = 0.0
    allocation: dict[str, Any] | None = field(default=None)
    request: dict[str, Any] | None = field(default=None)
    kind: Kind = Kind.JOB
    inside: str | None = None  # the held reservation this job runs inside, if any
