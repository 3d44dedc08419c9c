"""Crash recovery: make the store agree with what the hosts really run.

The hosts are the truth: every job domain carries its job id and allocation in `<metadata>`.
On start (and when a lost host comes back) each host's domains are matched with the store's
jobs on that host:

- a job whose guest still runs keeps running (it is watched again; its time limit counts from
  its recorded start);
- a job whose guest stopped while nobody watched is collected from its output disk in the spool;
- a job that was reserved but never got a guest goes back to the queue, in its old place;
- a guest whose job already ended (or was declared lost) is destroyed;
- guests of jobs this store does not know are left alone: another controller, or a `vmjob run`
  with another spool, may own them.

Finally every reservation held by a job that no longer holds a guest is freed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

import libvirt

from vmjobs import replug
from vmjobs.checkpoint import save_path
from vmjobs.codec import allocation_from_dict
from vmjobs.daemon.core import Active, Daemon, Phase, is_ours, time_limit_of
from vmjobs.domain_xml import Nic, read_metadata
from vmjobs.guest import JobFiles, Verdict, nics_for
from vmjobs.hostconn import lookup_domain
from vmjobs.jobs import ACTIVE, MOVING, JobRecord, JobState, domain_name
from vmjobs.runner import reap_abandoned
from vmjobs.store import Store

log = logging.getLogger("vmjobs.daemon")


@dataclass(frozen=True)
class Found:
    """A domain of ours on a host, from its `<metadata>`."""

    job_id: str
    running: bool


@dataclass
class Actions:
    keep: list[str] = field(default_factory=list)
    collect: list[str] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)
    destroy: list[str] = field(default_factory=list)  # job ids whose guests must go
    unknown: list[str] = field(default_factory=list)  # guests of jobs the store does not know


def classify(host: str, records: list[JobRecord], found: dict[str, Found]) -> Actions:
    """Pure: what to do with each of the store's jobs and the guests found on `host`."""
    actions = Actions()
    by_id = {r.id: r for r in records}
    for record in records:
        if record.host != host or record.state not in ACTIVE or not is_ours(record):
            continue
        guest = found.get(record.id)
        if guest is not None and guest.running:
            actions.keep.append(record.id)
        elif record.state == JobState.PLACED:
            actions.requeue.append(record.id)
        else:
            actions.collect.append(record.id)
    for job_id, _guest in found.items():
        record = by_id.get(job_id)
        if record is None:
            actions.unknown.append(job_id)
        elif record.state not in ACTIVE or record.host != host:
            actions.destroy.append(job_id)
    return actions


def domains_on(conn: libvirt.virConnect) -> dict[str, Found]:
    found: dict[str, Found] = {}
    for dom in conn.listAllDomains():
        try:
            meta = read_metadata(dom.XMLDesc(0))
            running = bool(dom.isActive())
        except libvirt.libvirtError:
            continue  # it vanished while we looked: it will not be running
        if meta is not None and meta.job_id:
            found[meta.job_id] = Found(meta.job_id, running)
    return found


def reconcile_host(daemon: Daemon, host: str) -> Actions:
    """Match one host's guests with the store. Runs under the daemon's lock, so a STOPPED
    event arriving meanwhile waits and then finds the job it is about."""
    conn = daemon.hosts.conn(host)
    if conn is None:
        return Actions()
    with daemon.lock:
        try:
            found = domains_on(conn)
        except libvirt.libvirtError as exc:
            log.warning("host %s: cannot list its domains: %s", host, exc.get_error_message())
            return Actions()
        actions = classify(host, daemon.store.jobs(), found)
        started = daemon.store.started_at()
        for job_id in actions.keep:
            record = daemon.store.job(job_id)
            assert record is not None
            limit = time_limit_of(record)
            begun = started.get(job_id)
            active = Active(job_id, host, limit, phase=Phase.RUNNING,
                            ends_at=begun + limit if begun is not None and limit else None)
            daemon.active[job_id] = active
            # in the job's timeline too: its guest outlived a daemon restart
            running_again(daemon.store, record, "found running at recovery")
            log.info("job %s: still running on %s", job_id, host)
        for job_id in actions.requeue:
            daemon.store.transition(job_id, JobState.QUEUED,
                                    "back in the queue: the daemon stopped before starting it",
                                    release=True)
        for job_id in actions.collect:
            active = Active(job_id, host, None, phase=Phase.COLLECTING)
            daemon.active[job_id] = active
            daemon.spawn(_collect_found, daemon, active, name=f"recover-{job_id}")
        for job_id in actions.unknown:
            log.info("host %s: leaving guest of unknown job %s alone", host, job_id)
        daemon.wake()
    for job_id in actions.destroy:
        log.info("job %s: its guest on %s outlived it; destroying", job_id, host)
        daemon.destroy_guest(host, job_id)
    return actions


def running_again(store: Store, record: JobRecord, reason: str) -> None:
    """Record that `record`'s guest runs: a transition to RUNNING, or a note when the store
    already says so."""
    if record.state == JobState.RUNNING:
        store.note(record.id, reason)
    else:
        store.transition(record.id, JobState.RUNNING, reason)


def _collect_found(daemon: Daemon, active: Active) -> None:
    files = JobFiles.of(daemon.config.spool, active.job_id)
    if not files.console(active.host).exists():
        # QEMU creates the console log when the guest starts: this one never did
        with daemon.lock:
            if daemon.active.get(active.job_id) is active:
                daemon.active.pop(active.job_id)
                daemon.store.transition(active.job_id, JobState.QUEUED,
                                        "back in the queue: its guest never started",
                                        release=True)
                daemon.wake()
        return
    # a collection cut short by the crash starts over
    shutil.rmtree(files.out, ignore_errors=True)
    daemon.collect(active)


def finish_interrupted_moves(daemon: Daemon) -> None:
    """Moves cut short by the daemon's end (its process drove them) are settled first, from
    where the guests really are: a migration that completed keeps the destination's
    reservation, one that did not gives it back; a checkpoint whose guest still runs did not
    happen, one whose guest is gone left a save image; a restore whose guest does not run
    leaves the job checkpointed."""
    where: dict[str, str] = {}
    for host in daemon.config.hosts:
        conn = daemon.hosts.conn(host.name)
        if conn is None:
            continue
        try:
            where.update({j: host.name for j, f in domains_on(conn).items() if f.running})
        except libvirt.libvirtError as exc:
            log.warning("host %s: cannot list its domains: %s", host.name,
                        exc.get_error_message())
    store = daemon.store
    with daemon.lock:
        migrating = [r.id for r in store.in_states(frozenset({JobState.MIGRATING}))]
        for record in store.jobs():
            job_id = record.spec.get("placeholder_for")
            if job_id is None:
                continue
            if record.allocation is not None and where.get(job_id) == record.host:
                store.move_reservation(job_id, record.id, allocation_from_dict(record.allocation))
                moved = store.job(job_id)
                if moved is not None:
                    running_again(store, moved,
                                  f"found on {record.host} after an interrupted migration")
            else:
                store.delete_job(record.id)
        for record in store.in_states(MOVING):
            running_here = record.host is not None and where.get(record.id) == record.host
            saved = save_path(daemon.config.spool, record.id).exists()
            if running_here or record.state == JobState.MIGRATING:
                store.transition(record.id, JobState.RUNNING,
                                 f"{record.state.value.lower()} interrupted by a daemon restart")
            elif saved:
                store.transition(record.id, JobState.CHECKPOINTED,
                                 f"{record.state.value.lower()} interrupted by a daemon restart; "
                                 "its checkpoint is kept", release=True)
            else:
                store.transition(record.id, JobState.RUNNING,
                                 "checkpoint interrupted by a daemon restart")
        for job_id in migrating:  # --replug-nics may have unplugged them on the way
            _plug_missing_nics(daemon, job_id)


def _plug_missing_nics(daemon: Daemon, job_id: str) -> None:
    """Plug back the NICs of its allocation that a running guest lacks. Caller holds the lock."""
    record = daemon.store.job(job_id)
    if record is None or record.allocation is None or not record.allocation.get("devices"):
        return
    alloc = allocation_from_dict(record.allocation)
    conn = daemon.hosts.conn(alloc.host)
    missing: list[Nic] = []
    try:
        dom = lookup_domain(conn, domain_name(job_id)) if conn is not None else None
        if dom is None:
            return
        have = replug.plugged(dom.XMLDesc(0))
        missing = [n for n in nics_for(alloc) if n.guest_address not in have]
        failed = replug.plug(dom, missing) if missing else None
    except libvirt.libvirtError as exc:
        failed = exc.get_error_message()
    if missing or failed:
        daemon.store.note(job_id, failed or f"{len(missing)} NIC(s) unplugged by an interrupted "
                          "migration plugged back")


def recover(daemon: Daemon) -> None:
    """On start: every reachable host reconciled; jobs on unreachable hosts lost; reservations
    of jobs without a guest freed."""
    finish_interrupted_moves(daemon)
    reap_abandoned(daemon.store, {h.name: c for h in daemon.config.hosts
                                  if (c := daemon.hosts.conn(h.name)) is not None})
    for host in daemon.config.hosts:
        if daemon.hosts.is_up(host.name):
            reconcile_host(daemon, host.name)
    with daemon.lock:
        names = {h.name for h in daemon.config.hosts}
        for record in daemon.store.in_states(ACTIVE):
            if not is_ours(record) or record.id in daemon.active:
                continue
            if record.host in names and daemon.hosts.is_up(record.host or ""):
                continue
            why = daemon.hosts.error(record.host or "") or "host no longer configured"
            daemon.finish(record.id, Verdict(daemon.lost_state(record),
                                             f"host {record.host} unreachable at recovery: {why}"))
        for job_id in daemon.store.reservations():
            record = daemon.store.job(job_id)
            if record is not None and record.state not in ACTIVE:
                daemon.store.note(job_id, "reservation freed at recovery", release=True)
        daemon.wake()
