"""Live migration of a running job's guest to another host, re-pinned for that host.

`migrate_job` is the job-level operation the daemon calls: reserve on the destination first
(through the placement engine), mark the job MIGRATING, migrate (`vmjobs.virt.migration`:
the destination's XML by `retarget_xml`, the copy by `migrate_domain`), then move the job's
reservation to the destination and release the source in one transaction. On any failure the
job keeps running on the source and the destination reservation is released.

At most `Policy.max_outbound` migrations leave one host at a time (file locks in the spool,
so CLI processes and the daemon share the limit); more wait their turn.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import placement
from placement import Allocation
from vmjobs import failpoints
from vmjobs.codec import allocation_from_dict, request_from_dict
from vmjobs.config import Config
from vmjobs.convergence import Policy
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError
from vmjobs.guest import JobFiles, nics_for
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.snapshot import snapshot
from vmjobs.store import Store
from vmjobs.virt import Connection, VirtError, replug
from vmjobs.virt.conn import is_running, lookup_domain
from vmjobs.virt.migration import (
    MigrationFailed,
    Outcome,
    Progress,
    landed,
    migratable_xml,
    migrate_domain,
    migration_uri,
    retarget_xml,
)

PLACEHOLDER_PREFIX = "mig-"
__all__ = ["MigrationFailed", "Moved", "Policy", "Progress", "migrate_job", "outbound_slot"]


# --- outbound slots -----------------------------------------------------------------------------

@contextmanager
def outbound_slot(spool: Path, host: str, limit: int, wait_s: float,
                  note: Callable[[str], None]) -> Iterator[int]:
    """Hold one of `limit` outbound-migration slots of `host` (shared by every process)."""
    locks = spool / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        for slot in range(max(limit, 1)):
            handle = open(locks / f"migrate-out.{host}.{slot}", "w")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield slot
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() >= deadline:
            raise MigrationFailed(f"{host} already has {limit} outbound migration(s) running; "
                                  f"waited {wait_s:.0f}s for a turn")
        if not told:
            note(f"waiting for an outbound migration slot on {host} ({limit} at a time)")
            told = True
        time.sleep(0.2)


# --- the job-level operation --------------------------------------------------------------------

@dataclass(frozen=True)
class Moved:
    job_id: str
    source: str
    destination: str
    allocation: Allocation
    outcome: Outcome
    clock: str  # what happened to the guest's wall clock
    nics: str = ""  # with replug_nics: which NICs were plugged in on the destination


def placeholder_id(job_id: str) -> str:
    return f"{PLACEHOLDER_PREFIX}{job_id}"


def running_job(store: Store, job_id: str) -> tuple[JobRecord, Allocation]:
    record = store.job(job_id)
    if record is None:
        raise NotFound(f"unknown job {job_id!r}")
    if record.state != JobState.RUNNING or record.allocation is None or record.host is None:
        raise VmjobsError(f"job {job_id} is {record.state.value}, not RUNNING")
    return record, allocation_from_dict(record.allocation)


def reserve_elsewhere(store: Store, hosts: list[placement.Host], record: JobRecord,
                      to: str | None, reason: str) -> Allocation:
    """Reserve room for `record`'s request on `to` (or wherever the engine chooses, never its
    current host) under a placeholder job, in one transaction; the job keeps what it holds."""
    if record.request is None:
        raise VmjobsError(f"job {record.id} has no recorded request; it cannot be placed again")
    request = replace(request_from_dict(record.request), host=to)
    with store.reserving():
        cluster = snapshot(store, hosts)
        if to is not None:
            if to == record.host:
                raise VmjobsError(f"job {record.id} already runs on {to}")
            decision = cluster.place(request)
        else:
            decision = cluster.place_within(request, exclude=frozenset({record.host or ""}))
        if decision.allocation is None:
            where = to or f"any host but {record.host}"
            raise DoesNotFit(f"no room for job {record.id} on {where}: "
                             f"{decision.explanation.summary}")
        store.add_job(
            JobRecord(id=placeholder_id(record.id), owner=record.owner, uid=record.uid,
                      state=JobState.PLACED,
                      spec={"placeholder_for": record.id, "reason": reason}),
            request, decision.allocation, f"{reason} (placeholder for job {record.id})",
        )
        return decision.allocation


def release_placeholder(store: Store, job_id: str) -> None:
    if store.job(placeholder_id(job_id)) is not None:
        store.delete_job(placeholder_id(job_id))


def migrate_job(config: Config, store: Store, conns: Mapping[str, Connection],
                hosts: list[placement.Host], job_id: str, to: str | None = None,
                policy: Policy | None = None,
                on_progress: Callable[[Progress], None] | None = None,
                note: Callable[[str], None] = lambda _m: None,
                replug_nics: bool = False,
                should_abort: Callable[[], str | None] = lambda: None,
                prepare_destination: Callable[[str], None] = lambda _host: None) -> Moved:
    """Move a RUNNING job's guest to `to` (or where the engine says) while it runs.

    `prepare_destination(host)`: called once the destination is reserved, before the copy
    (a gang member's network is made there); an exception fails the move like any other.

    `should_abort`: see `migrate_domain`; an aborted migration raises MigrationFailed and
    leaves the job running on its source.

    `replug_nics`: unplug the job's NICs first and plug the destination's at the same guest
    addresses afterwards (`vmjobs.virt.replug`); required for passthrough (vfio) NICs, which cannot
    be migrated.
    """
    from vmjobs.virt import guestclock

    policy = policy or Policy()
    record, source_alloc = running_job(store, job_id)
    source = record.host or ""
    if source_alloc.devices and config.nic_backend == "vfio" and not replug_nics:
        raise MigrationFailed(f"job {job_id} has passthrough NICs "
                              f"({', '.join(source_alloc.devices)}); they block live migration "
                              "(--replug-nics unplugs them and plugs equivalent NICs of the "
                              "destination in at the same guest addresses)")
    replugging = replug_nics and bool(source_alloc.devices)
    if to is not None and to not in conns:  # a configured host (the API checked) that is down
        raise VmjobsError(f"host {to} is not reachable")
    dom = lookup_domain(conns[source], domain_name(job_id))
    if dom is None or not is_running(dom):
        raise VmjobsError(f"job {job_id}'s guest is not running on {source}")
    with outbound_slot(config.spool, source, policy.max_outbound, policy.slot_wait_s, note):
        alloc = reserve_elsewhere(store, hosts, record, to, f"migrating job {job_id} here")
        dest = alloc.host
        unplugged = False
        try:
            store.transition(job_id, JobState.MIGRATING, f"live migration {source} -> {dest}")
            failpoints.hit("migrate:reserved")
            prepare_destination(dest)
            if replugging:
                note(f"unplugging {len(source_alloc.devices)} NIC(s) on {source}")
                replug.unplug(dom, nics_for(source_alloc))
                unplugged = True
            files = JobFiles.of(config.spool, job_id)
            dest_xml = retarget_xml(migratable_xml(dom), alloc,
                                    config.host(dest).reserved_cpus,
                                    files.next_console(store.ran_on(job_id), dest),
                                    files.new_output())
            outcome = migrate_domain(dom, conns[dest], dest_xml,
                                     migration_uri(config.host(dest).uri), policy,
                                     source_alloc.memory_mib, on_progress,
                                     should_abort=should_abort)
        except BaseException as exc:
            moved_anyway = landed(conns[dest], domain_name(job_id)) and not is_running(dom)
            if not moved_anyway:
                release_placeholder(store, job_id)
                message = exc.get_error_message() if isinstance(exc, VirtError) \
                    else str(exc)
                if unplugged and is_running(dom):  # the guest gets its own NICs back
                    message += "; " + (replug.plug(dom, nics_for(source_alloc))
                                       or "its NICs were plugged back")
                still = "still running on" if is_running(dom) else "NOT running on"
                store.transition(job_id, JobState.RUNNING,
                                 f"migration to {dest} failed: {message}; {still} {source}")
                if isinstance(exc, VmjobsError | VirtError):
                    raise MigrationFailed(f"job {job_id}: migration {source} -> {dest} failed: "
                                          f"{message}; the job is {still} {source}") from None
                raise
            outcome = Outcome(0.0, None, None, policy.max_downtime_ms, False,
                              ("the guest arrived although the migration reported an error",),
                              lookup_domain(conns[dest], domain_name(job_id)))
        failpoints.hit("migrate:landed")
        store.move_reservation(job_id, placeholder_id(job_id), alloc)
        clock = guestclock.sync_quietly(conns[dest], domain_name(job_id))
        nics = ""
        if unplugged:
            arrived = outcome.dom or lookup_domain(conns[dest], domain_name(job_id))
            failed = replug.plug(arrived, nics_for(alloc)) if arrived is not None \
                else "plugging NICs failed: the guest is not on the destination"
            nics = failed or f"NICs {', '.join(alloc.devices)} plugged in"
        downtime = f"{outcome.downtime_ms} ms" if outcome.downtime_ms is not None else "?"
        store.transition(job_id, JobState.RUNNING,
                         f"migrated from {source} in {outcome.duration_s:.1f}s, downtime "
                         f"{downtime}; clock {clock}" + (f"; {nics}" if nics else ""))
        return Moved(job_id, source, dest, alloc, outcome, clock, nics)
