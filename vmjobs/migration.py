"""Live migration of a running job's guest to another host, re-pinned for that host.

Three layers, each usable on its own:

- `retarget_xml`: a pure transform of a domain's migratable XML (or a save image's XML) for
  another host: `<cputune>` and `<numatune>` rebuilt from the destination's allocation with
  `domain_xml`'s own builders (pinning is recomputed, never copied), the `<metadata>`
  allocation replaced, the console moved to the destination's segment (`JobFiles.console`).
  Everything else (machine type, device addresses, output disk path) is kept, so the guest's
  ABI is unchanged; a destination whose NUMA split would change the guest's NUMA cells is
  refused.
- `migrate_domain`: one live migration driven through libvirt (`migrate3` with
  `VIR_MIGRATE_PARAM_DEST_XML`, LIVE, transient on the destination): a thin loop that polls
  `jobStats` and carries out what the pure `convergence.step` decides (start at the policy's
  max downtime and raise it in steps while the copy stalls, optionally a switch to post-copy;
  abort after a completion timeout scaled per GiB of guest memory, when no progress was made
  for `progress_timeout_s`, or when the caller asks). Needs no store: the smoke test and the
  benchmark use it against bare libvirt URIs.
- `migrate_job`: the job-level operation the daemon calls: reserve on the destination first
  (through the placement engine), mark the job MIGRATING, migrate, then move the job's
  reservation to the destination and release the source in one transaction. On any failure
  the job keeps running on the source and the destination reservation is released.

At most `Policy.max_outbound` migrations leave one host at a time (file locks in the spool,
so CLI processes and the daemon share the limit); more wait their turn.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import libvirt

import placement
from placement import Allocation
from vmjobs import convergence, failpoints, replug
from vmjobs.codec import allocation_from_dict, request_from_dict
from vmjobs.config import Config
from vmjobs.convergence import Policy
from vmjobs.errors import DoesNotFit, NotFound, VmjobsError
from vmjobs.guest import JobFiles, nics_for
from vmjobs.hostconn import is_running, lookup_domain
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.retarget import MigrationFailed, retarget_xml
from vmjobs.runner import snapshot
from vmjobs.store import Store

PLACEHOLDER_PREFIX = "mig-"


def pinning_of(dom: libvirt.virDomain) -> tuple[frozenset[int], ...]:
    """The host cpus each vCPU of a running guest may run on, as libvirt reports them."""
    return tuple(frozenset(i for i, on in enumerate(row) if on) for row in dom.vcpuPinInfo(0))


# --- one live migration -------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    memory_total: int
    memory_remaining: int
    memory_processed: int
    rate_bps: int
    downtime_ms: int  # the limit in force
    phase: str  # "copying" | "stalled" | "post-copy" | "aborting"


@dataclass(frozen=True)
class Outcome:
    duration_s: float
    downtime_ms: int | None  # as libvirt measured it
    memory_bytes: int | None  # transferred
    downtime_limit_ms: int  # the limit in force at the end
    postcopy: bool
    steps: tuple[str, ...] = ()  # what the policy did, in order
    dom: libvirt.virDomain | None = field(default=None, compare=False)  # on the destination


def migration_uri(dest_libvirt_uri: str) -> str | None:
    """Where QEMU should send the guest: the destination's address, taken from its libvirt
    URI (the destination's own hostname may not resolve from the source)."""
    host = urlparse(dest_libvirt_uri).hostname
    return f"tcp://{host}" if host else None


def _stat(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) else 0


def migrate_domain(dom: libvirt.virDomain, dconn: libvirt.virConnect, dest_xml: str,
                   dest_uri: str | None, policy: Policy, memory_mib: int,
                   on_progress: Callable[[Progress], None] | None = None,
                   poll_s: float = 0.25,
                   should_abort: Callable[[], str | None] = lambda: None) -> Outcome:
    """Live-migrate `dom` to `dconn` as `dest_xml`; raise MigrationFailed if it did not move.

    `should_abort` is asked every `poll_s` seconds: a reason (a cancel, a time limit reached)
    aborts the migration while the guest still runs on the source, so the caller can act on
    it there within a poll instead of waiting for the copy to end. Once in post-copy the
    guest runs on the destination and the migration is never aborted.
    """
    flags = libvirt.VIR_MIGRATE_LIVE
    if policy.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if policy.postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if policy.shared_storage:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
    if dest_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = dest_uri
    if policy.bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = policy.bandwidth_mib_s
    try:
        dom.migrateSetMaxDowntime(policy.max_downtime_ms, 0)
    except libvirt.libvirtError as exc:
        raise MigrationFailed(f"cannot set the downtime limit: {exc.get_error_message()}") from None

    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            result["dom"] = dom.migrate3(dconn, params, flags)
        except libvirt.libvirtError as exc:
            result["error"] = exc.get_error_message()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller's thread
            result["error"] = str(exc)

    started = time.monotonic()
    thread = threading.Thread(target=worker, name="migrate3", daemon=True)
    thread.start()
    steps: list[str] = []
    w = convergence.watch(policy, memory_mib, started)
    while thread.is_alive():
        thread.join(poll_s)
        if not thread.is_alive():
            break
        now = time.monotonic()
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError:
            continue  # the job is ending; the worker will say how
        remaining = _stat(stats, libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING)
        if remaining:
            failpoints.hit("migrate:copying")
        decided = convergence.step(w, policy, now, remaining,
                                   _stat(stats, libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL),
                                   None if w.aborted or w.in_postcopy else should_abort())
        w = decided.watch
        steps += decided.notes
        try:
            if decided.set_downtime_ms is not None:
                dom.migrateSetMaxDowntime(decided.set_downtime_ms, 0)
            if decided.start_postcopy:
                dom.migrateStartPostCopy(0)
            if decided.abort is not None:
                dom.abortJob()
        except libvirt.libvirtError as exc:
            steps.append(f"{decided.phase}: libvirt refused: {exc.get_error_message()}")
            if decided.start_postcopy:
                w = replace(w, in_postcopy=False)
        if on_progress is not None:
            on_progress(Progress(
                elapsed_s=now - started,
                memory_total=_stat(stats, libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL),
                memory_remaining=remaining,
                memory_processed=_stat(stats, libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED),
                rate_bps=_stat(stats, libvirt.VIR_DOMAIN_JOB_MEMORY_BPS),
                downtime_ms=w.downtime_ms, phase=decided.phase,
            ))
    duration = time.monotonic() - started
    if "error" in result or result.get("dom") is None:
        why = w.aborted or result.get("error") or "migrate3 returned no domain"
        raise MigrationFailed(why)
    dest_dom: libvirt.virDomain = result["dom"]
    downtime_measured = transferred = None
    try:
        done = dest_dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if libvirt.VIR_DOMAIN_JOB_DOWNTIME in done:
            downtime_measured = int(done[libvirt.VIR_DOMAIN_JOB_DOWNTIME])
        if libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED in done:
            transferred = int(done[libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED])
    except libvirt.libvirtError:
        pass
    return Outcome(duration, downtime_measured, transferred, w.downtime_ms, w.in_postcopy,
                   tuple(steps), dest_dom)


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


def migrate_job(config: Config, store: Store, conns: Mapping[str, libvirt.virConnect],
                hosts: list[placement.Host], job_id: str, to: str | None = None,
                policy: Policy | None = None,
                on_progress: Callable[[Progress], None] | None = None,
                note: Callable[[str], None] = lambda _m: None,
                replug_nics: bool = False,
                should_abort: Callable[[], str | None] = lambda: None) -> Moved:
    """Move a RUNNING job's guest to `to` (or where the engine says) while it runs.

    `should_abort`: see `migrate_domain`; an aborted migration raises MigrationFailed and
    leaves the job running on its source.

    `replug_nics`: unplug the job's NICs first and plug the destination's at the same guest
    addresses afterwards (`vmjobs.replug`); required for passthrough (vfio) NICs, which cannot
    be migrated.
    """
    from vmjobs import guestclock

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
            if replugging:
                note(f"unplugging {len(source_alloc.devices)} NIC(s) on {source}")
                replug.unplug(dom, nics_for(source_alloc))
                unplugged = True
            files = JobFiles.of(config.spool, job_id)
            dest_xml = retarget_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), alloc,
                                    config.host(dest).reserved_cpus,
                                    files.next_console(store.ran_on(job_id), dest),
                                    files.new_output())
            outcome = migrate_domain(dom, conns[dest], dest_xml,
                                     migration_uri(config.host(dest).uri), policy,
                                     source_alloc.memory_mib, on_progress,
                                     should_abort=should_abort)
        except BaseException as exc:
            moved_anyway = _landed(conns[dest], job_id) and not is_running(dom)
            if not moved_anyway:
                release_placeholder(store, job_id)
                message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) \
                    else str(exc)
                if unplugged and is_running(dom):  # the guest gets its own NICs back
                    message += "; " + (replug.plug(dom, nics_for(source_alloc))
                                       or "its NICs were plugged back")
                still = "still running on" if is_running(dom) else "NOT running on"
                store.transition(job_id, JobState.RUNNING,
                                 f"migration to {dest} failed: {message}; {still} {source}")
                if isinstance(exc, VmjobsError | libvirt.libvirtError):
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


def _landed(dconn: libvirt.virConnect, job_id: str) -> bool:
    try:
        dom = lookup_domain(dconn, domain_name(job_id))
        return dom is not None and bool(dom.isActive()) and \
            dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError:
        return False
