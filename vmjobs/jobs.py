"""What a job is: its states and the record the store keeps of it."""

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

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.LOST,
     JobState.EXPIRED}
)
# States in which a job holds (or is about to hold) a guest on a host.
ACTIVE = frozenset({JobState.PLACED, JobState.STARTING, JobState.RUNNING,
                    JobState.UNREACHABLE})


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
