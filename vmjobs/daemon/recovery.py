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
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmjobs import gang, gangnet
from vmjobs.checkpoint import save_path
from vmjobs.codec import allocation_from_dict
from vmjobs.daemon import gangwire, resizewire
from vmjobs.daemon.core import Active, Daemon, Phase, is_ours, time_limit_of
from vmjobs.guest import JobFiles, nics_for
from vmjobs.jobs import ACTIVE, MOVING, JobRecord, JobState, Kind, domain_name
from vmjobs.virt import Connection, Domain, VirtError, domains, guestclock, replug
from vmjobs.virt.conn import destroy_quietly, is_running, lookup_domain
from vmjobs.virt.domain_xml import Nic

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


def domains_on(conn: Connection) -> dict[str, Found]:
    """Every guest on the host that carries a job's <metadata>; VirtError if unlisted."""
    return {job_id: Found(job_id, running)
            for job_id, running in domains.job_guests(conn).items()}


def reconcile_host(daemon: Daemon, host: str) -> Actions:
    """Match one host's guests with the store. Runs under the daemon's lock, so a STOPPED
    event arriving meanwhile waits and then finds the job it is about."""
    conn = daemon.hosts.conn(host)
    if conn is None:
        return Actions()
    with daemon.lock:
        try:
            found = domains_on(conn)
        except VirtError as exc:
            log.warning("host %s: cannot list its domains: %s", host, exc.get_error_message())
            return Actions()
        # the jobs that concern this host only (an index), not every job of the store: a
        # start reconciles each host in turn
        actions = classify(host, daemon.store.jobs_concerning(host, list(found)), found)
        started = daemon.store.started_at(actions.keep)
        for job_id in actions.keep:
            record = daemon.store.job(job_id)
            assert record is not None
            limit = time_limit_of(record)
            begun = started.get(job_id)
            before = daemon.active.get(job_id)  # the job was UNREACHABLE: keep its stop
            active = Active(job_id, host, limit, phase=Phase.RUNNING,
                            ends_at=begun + limit if begun is not None and limit else None,
                            stop=before.stop if before is not None else None)
            daemon.admit(active)
            # in the job's timeline too: its guest outlived a daemon or libvirtd restart
            running_again(
                daemon, record,
                f"host {host} back: guest still running" if record.state == JobState.UNREACHABLE
                else "found running at recovery")
            log.info("job %s: still running on %s", job_id, host)
            if active.stop is not None:  # cancelled while its host was away: carried out now
                daemon.spawn(daemon.destroy_guest, host, job_id, name=f"stop-{job_id}")
            elif gangwire.gang_ref(record) is not None:  # its vmjob-ctl port, again
                daemon.spawn(gangwire.member_running, daemon, record, host,
                             name=f"ctl-attach-{job_id}")
            elif resizewire.serves(daemon, record):
                daemon.spawn(resizewire.running, daemon, record, host,
                             name=f"ctl-attach-{job_id}")
        for job_id in actions.requeue:
            daemon.record(job_id, JobState.QUEUED,
                          "back in the queue: the daemon stopped before starting it",
                          release=True)
        for job_id in actions.collect:
            before = daemon.active.get(job_id)
            active = Active(job_id, host, None, phase=Phase.COLLECTING,
                            stop=before.stop if before is not None else None)
            daemon.admit(active)
            daemon.spawn(_collect_found, daemon, active, name=f"recover-{job_id}",
                         job_id=job_id)
        for job_id in actions.unknown:
            log.info("host %s: leaving guest of unknown job %s alone", host, job_id)
        daemon.wake()
    for job_id in actions.destroy:
        log.info("job %s: its guest on %s outlived it; destroying", job_id, host)
        daemon.destroy_guest(host, job_id)
    return actions


def running_again(daemon: Daemon, record: JobRecord, reason: str) -> None:
    """Record that `record`'s guest runs: a transition to RUNNING, or a note when the store
    already says so. Caller holds the lock."""
    if record.state == JobState.RUNNING:
        daemon.store.note(record.id, reason)
    else:
        daemon.record(record.id, JobState.RUNNING, reason)


def _collect_found(daemon: Daemon, active: Active) -> None:
    files = JobFiles.of(daemon.config.spool, active.job_id)
    if not files.console(active.host).exists():
        # QEMU creates the console log when the guest starts: this one never did
        with daemon.lock:
            if daemon.active.get(active.job_id) is active:
                daemon.drop(active.job_id)
                daemon.record(active.job_id, JobState.QUEUED,
                              "back in the queue: its guest never started", release=True)
                daemon.wake()
        return
    # a collection cut short by the crash starts over
    shutil.rmtree(files.out, ignore_errors=True)
    daemon.collect(active)


@dataclass(frozen=True)
class Copy:
    """One copy of a job's guest found on a host after a move was cut short."""

    host: str
    running: bool  # libvirt's RUNNING state; a paused copy is never taken for a running one


@dataclass(frozen=True)
class Survivor:
    """Which copy of a job's guest lives on after an interrupted move."""

    keep: Copy | None
    resume: bool  # the kept copy is paused and must be resumed
    destroy: tuple[Copy, ...]


def choose_copy(source: str | None, destination: str | None, copies: list[Copy]) -> Survivor:
    """Pure: the copy that survives an interrupted move; every other copy goes.

    A running copy wins over a paused one: a migration's hand-over leaves the destination
    running and the source paused, and the source must never be taken for the live one (it
    is stale the moment the destination runs). Two running copies never happen with libvirt;
    if they did, the destination's is the one that ran last. With only paused copies, the
    source's is resumed: libvirt resumes the source when a migration is cancelled, and a
    destination copy that was never resumed has not run.
    """
    order = {destination: 0, source: 1}
    running = sorted((c for c in copies if c.running), key=lambda c: order.get(c.host, 2))
    if running:
        keep, resume = running[0], False
    else:
        paused = sorted(copies, key=lambda c: {source: 0, destination: 1}.get(c.host, 2))
        keep, resume = (paused[0], True) if paused else (None, False)
    return Survivor(keep, resume, tuple(c for c in copies if c is not keep))


QUIESCE_S = 120.0


def _copies(daemon: Daemon, job_ids: set[str]) -> dict[str, list[tuple[Copy, Domain]]]:
    """Every copy of these jobs' guests on every reachable host, once their libvirt jobs
    have ended."""
    found: dict[str, list[tuple[Copy, Domain]]] = {}
    deadline = time.monotonic() + QUIESCE_S
    for host in daemon.config.hosts:
        conn = daemon.hosts.conn(host.name)
        if conn is None:
            continue
        for job_id in job_ids:
            try:
                dom = lookup_domain(conn, domain_name(job_id))
                if dom is None:
                    continue
                domains.quiesce(dom, deadline)
                if not is_running(dom):
                    continue
                running = domains.is_unpaused(dom)
            except VirtError:
                continue  # gone meanwhile
            found.setdefault(job_id, []).append((Copy(host.name, running), dom))
    return found


def finish_interrupted_moves(daemon: Daemon) -> None:
    """Moves cut short by the daemon's end (its process drove them) are settled first, from
    the copies of the guests the hosts really have, so that each job ends with exactly one
    guest, running, or a complete checkpoint and none:

    - a migration keeps the copy `choose_copy` picks, with the reservation of its host (the
      destination's placeholder becomes the job's, or is dropped); the other copy is destroyed;
    - a checkpoint whose guest still exists did not happen: the guest runs on, the partial
      file is removed; one whose guest is gone left a complete save (libvirt stops the guest
      only once the file is written): CHECKPOINTED;
    - a restore whose guest exists happened: the save file is removed; one whose guest does
      not exist did not: CHECKPOINTED, the file kept.
    A guest that arrived somewhere new gets its clock set."""
    with daemon.lock:
        placeholders = {r.spec["placeholder_for"]: r for r in daemon.store.jobs()
                        if r.spec.get("placeholder_for") is not None}
        moving = {r.id: r for r in daemon.store.in_states(MOVING)}
    copies = _copies(daemon, set(moving) | set(placeholders))
    arrived: list[tuple[str, str]] = []  # (job, host) whose clock must be set
    with daemon.lock:
        for job_id in sorted(set(moving) | set(placeholders)):
            record = moving.get(job_id) or daemon.store.job(job_id)
            if record is None:
                continue
            placeholder = placeholders.get(job_id)
            found = copies.get(job_id, [])
            survivor = choose_copy(record.host, placeholder.host if placeholder else None,
                                   [c for c, _dom in found])
            doms = {c.host: dom for c, dom in found}
            for gone in survivor.destroy:
                log.info("job %s: destroying its %s copy on %s left by an interrupted move",
                         job_id, "running" if gone.running else "paused", gone.host)
                destroy_quietly(doms[gone.host])
            keep = survivor.keep
            if keep is not None and survivor.resume:
                try:
                    domains.resume(doms[keep.host])
                except VirtError as exc:
                    log.warning("job %s: resuming its guest on %s failed: %s", job_id,
                                keep.host, exc.get_error_message())
            _settle_record(daemon, record, placeholder, keep, arrived)
        for job_id in [r.id for r in moving.values() if r.state == JobState.MIGRATING]:
            _plug_missing_nics(daemon, job_id)  # --replug-nics may have unplugged them
    for job_id, host in arrived:
        conn = daemon.hosts.conn(host)
        if conn is not None:
            clock = guestclock.sync_quietly(conn, domain_name(job_id))
            with daemon.lock:
                daemon.store.note(job_id, f"clock {clock}")


def _settle_record(daemon: Daemon, record: JobRecord, placeholder: JobRecord | None,
                   keep: Copy | None, arrived: list[tuple[str, str]]) -> None:
    """The store follows the surviving copy (see `finish_interrupted_moves`). Caller holds the
    lock."""
    job_id = record.id
    state = record.state.value.lower()
    saved = save_path(daemon.config.spool, job_id)
    if placeholder is not None:
        if keep is not None and keep.host == placeholder.host and placeholder.allocation:
            daemon.store.move_reservation(job_id, placeholder.id,
                                          allocation_from_dict(placeholder.allocation))
            running_again(daemon, record,
                          f"found on {keep.host} after an interrupted migration")
            arrived.append((job_id, keep.host))
            return
        daemon.store.delete_job(placeholder.id)
    if record.state == JobState.RESTORING:
        if keep is not None:
            saved.unlink(missing_ok=True)
            daemon.record(job_id, JobState.RUNNING,
                          f"restored on {keep.host}; found after an interrupted restore")
            arrived.append((job_id, keep.host))
        else:
            daemon.record(job_id, JobState.CHECKPOINTED,
                          "restore interrupted by a daemon restart; its checkpoint is kept",
                          release=True)
        return
    if record.state == JobState.CHECKPOINTING and keep is None and saved.exists():
        daemon.record(job_id, JobState.CHECKPOINTED,
                      "checkpoint interrupted by a daemon restart; its save was complete",
                      release=True)
        return
    if record.state == JobState.CHECKPOINTING:
        saved.unlink(missing_ok=True)  # a save that did not finish: its guest runs on
    if record.state in MOVING:
        where = f"still on {keep.host}" if keep is not None else "its guest is gone"
        daemon.record(job_id, JobState.RUNNING, f"{state} interrupted by a daemon restart; {where}")


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
        have = replug.plugged(domains.live_xml(dom))
        missing = [n for n in nics_for(alloc) if n.guest_address not in have]
        failed = replug.plug(dom, missing) if missing else None
    except VirtError as exc:
        failed = exc.get_error_message()
    if missing or failed:
        daemon.store.note(job_id, failed or f"{len(missing)} NIC(s) unplugged by an interrupted "
                          "migration plugged back")


def runner_identity() -> dict[str, Any]:
    """What a direct `vmjob run` keeps in its job's spec (`runner`): enough to tell later
    whether the process running the job is still alive (pids recycle: its start time and the
    boot too)."""
    return {"pid": os.getpid(), "start": _process_start(os.getpid()), "boot": _boot_id()}


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def runner_alive(runner: dict[str, Any]) -> bool:
    if runner.get("boot") != _boot_id():
        return False
    start_ticks = _process_start(int(runner.get("pid", -1)))
    return start_ticks is not None and start_ticks == runner.get("start")


def reap_abandoned(daemon: Daemon) -> list[str]:
    """Free what the direct runs whose `vmjob run` process died (kill -9, power loss) held;
    the ids of their jobs.

    Nobody else would: a direct run's job is followed only by its own process. Its guest's
    result has no one to go to, so the guest is stopped and the job marked LOST; one that died
    before its job was placed leaves no trace (it never started). Live direct runs are never
    touched."""
    reaped = []
    with daemon.lock:
        holding = daemon.store.reservations()
        # a finished job may still hold its cores: its end is recorded at power-off, its
        # cores freed once QEMU is gone
        records = [r for r in daemon.store.jobs()
                   if (not r.state.finished or r.id in holding) and r.spec.get("runner")
                   and not runner_alive(r.spec["runner"])]
    for record in records:
        if record.state == JobState.QUEUED:
            with daemon.lock:
                daemon.store.delete_job(record.id)
            daemon.forget_files(record.id)
            continue
        conn = daemon.hosts.conn(record.host or "")
        if conn is None:
            continue  # its host is away: looked at again by the next run or daemon start
        destroy_quietly(lookup_domain(conn, domain_name(record.id)))
        with daemon.lock:
            if record.state.finished:  # only its cores were left to free
                daemon.free(record.id)
                continue
            daemon.record(record.id, JobState.LOST, "the vmjob process running it is gone",
                          release=True)
        reaped.append(record.id)
    return reaped


def recover(daemon: Daemon) -> None:
    """On start: every reachable host reconciled; jobs on unreachable hosts lost; reservations
    of jobs without a guest freed."""
    finish_interrupted_moves(daemon)
    reap_abandoned(daemon)
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
            if record.host not in names:
                daemon.on_job_lost(record, f"host {record.host} no longer configured")
            elif record.state == JobState.PLACED:  # it never got a guest
                daemon.record(record.id, JobState.QUEUED,
                              f"back in the queue: host {record.host} unreachable",
                              release=True)
            else:  # its guest may run on: wait for the host (hosts.py reports it lost in time)
                why = daemon.hosts.error(record.host or "") or "unreachable"
                daemon.admit(Active(record.id, record.host or "", time_limit_of(record),
                                    phase=Phase.RUNNING))
                if record.state != JobState.UNREACHABLE:
                    daemon.record(
                        record.id, JobState.UNREACHABLE,
                        f"host {record.host} not responding at recovery: {why}")
        for job_id in daemon.store.reservations():
            record = daemon.store.job(job_id)
            if record is not None and record.state not in ACTIVE | {JobState.HELD}:
                daemon.store.note(job_id, "reservation freed at recovery", release=True)
        tied = [r.id for r in daemon.store.in_states(frozenset({JobState.QUEUED, JobState.HELD}))
                if r.kind == Kind.RESERVATION and r.spec.get("tied")]
        # a checkpointed member keeps its gang's network (its slot: the addresses its
        # saved guest has) and control state for its restore
        live = live_gangs(daemon.store.in_states(ACTIVE | MOVING | {JobState.CHECKPOINTED}))
        daemon.wake()
    # a reservation tied to its client's connection (no --duration) lost it with the daemon
    for reservation_id in tied:
        daemon.spawn(daemon.end_reservation, reservation_id, JobState.RELEASED,
                     "the daemon restarted: the client connection it was tied to is gone",
                     name=f"release-{reservation_id}")
    sweep_gang_networks(daemon, live)


def live_gangs(records: list[JobRecord]) -> set[str]:
    """The gangs with a member that still holds (or may hold) a guest."""
    return {ref.gang_id for r in records if (ref := gang.gang_of(r.spec)) is not None}


def sweep_gang_networks(daemon: Daemon, live: set[str]) -> None:
    """Remove the gang networks no live gang owns (the daemon stopped before it could), on
    the hosts that answer; the others keep them until the next recovery. The control state
    of gangs that are not live goes too."""
    if daemon.scope is not None:
        return  # a direct run's core has no gangs
    if daemon.control.journal is not None:  # and their control state
        daemon.control.journal.forget_except(live)
    for line in gangnet.sweep(daemon.config.spool, gangnet.host_nets(daemon.config), live):
        log.info("recovery: %s", line)
