"""`vmjob run` without a daemon: place, reserve, start, stream, collect, release.

Every exit path releases what was reserved. Before the guest exists, a failure forgets the job
entirely (no row, no spool directory); after, the job keeps its record and its console log.
"""

from __future__ import annotations

import codecs
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import placement
from placement import Allocation, Request
from vmjobs import template
from vmjobs.config import Config
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.guest import GuestEnd, GuestPlan, JobFiles, collect, follow_output
from vmjobs.image import resolve_image
from vmjobs.jobs import JobRecord, JobState, domain_name, new_job_id
from vmjobs.spec import check_paths
from vmjobs.spec import parse as parse_spec
from vmjobs.store import Held, Store
from vmjobs.virt import Connection, Domain, VirtError, probe
from vmjobs.virt.conn import connect_hosts, destroy_quietly, lookup_domain
from vmjobs.virt.events import start_event_loop

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_VMJOB_FAILED = 125  # the job ran but vmjob could not deliver its result
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass(frozen=True)
class RunRequest:
    argv: tuple[str, ...]
    request: Request
    env: dict[str, str] = field(default_factory=dict)
    input_dir: Path | None = None
    output_dir: Path | None = None
    timeout_s: float | None = None
    image: str = "default"


class Interrupted(BaseException):
    """Ctrl+C or SIGTERM while a job runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def interruptible() -> Iterator[None]:
    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def validate(job: RunRequest) -> None:
    """Refuse bad input before anything is reserved or written: the rules of every job spec
    (`vmjobs.spec`; the CLI has applied them already) and the local directories."""
    spec = parse_spec({"argv": list(job.argv), "env": dict(job.env)})
    check_paths(replace(spec, input=str(job.input_dir) if job.input_dir else None,
                        output=str(job.output_dir) if job.output_dir else None))


def _runner_identity() -> dict[str, Any]:
    """Enough to tell later whether the process running a job is still alive (pids recycle)."""
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


def _runner_alive(runner: dict[str, Any]) -> bool:
    if runner.get("boot") != _boot_id():
        return False
    start_ticks = _process_start(int(runner.get("pid", -1)))
    return start_ticks is not None and start_ticks == runner.get("start")


def reap_abandoned(store: Store, conns: dict[str, Connection]) -> list[str]:
    """Free reservations of jobs whose `vmjob run` process died (kill -9, power loss).

    Without a daemon nobody else would: the guest's result has no one to go to, so the guest is
    stopped and the job marked LOST.
    """
    reaped = []
    for record in store.jobs():
        runner = record.spec.get("runner")
        if record.allocation is None or not runner or _runner_alive(runner):
            continue
        conn = conns.get(record.host or "")
        if conn is None:
            continue
        destroy_quietly(lookup_domain(conn, domain_name(record.id)))
        if record.state.finished:  # its end was recorded at power-off, its cores not yet freed
            store.release(record.id)
            continue
        store.transition(record.id, JobState.LOST, "the vmjob process running it is gone",
                         release=True)
        reaped.append(record.id)
    return reaped


def snapshot(store: Store, hosts: list[placement.Host],
             pinned: Callable[[Held], bool] = lambda _held: False) -> placement.Cluster:
    """The engine's view: hardware from libvirt, holdings from the store (migration
    placeholders too), hosts cordoned in the store (drain) taking nothing new. Holdings for
    which `pinned` is true are held with their request tied to their host, so the planners
    (which only move jobs whose request names no host) leave them where they are."""
    cluster = placement.Cluster(hosts)
    for name in store.cordoned():
        if name in cluster.hosts and cluster.hosts[name].state == placement.HostState.UP:
            cluster.set_state(name, placement.HostState.CORDONED)
    for held in store.held():
        if held.allocation.host in cluster.hosts:
            request = replace(held.request, host=held.allocation.host) if pinned(held) \
                else held.request
            try:
                cluster.reserve(held.job_id, held.allocation, request)
            except placement.Conflict as exc:
                raise VmjobsError(
                    f"job {held.job_id}'s reservation no longer matches host "
                    f"{held.allocation.host}: {exc}"
                ) from None
    return cluster


def run(config: Config, job: RunRequest, write: Callable[[str], None],
        note: Callable[[str], None]) -> int:
    """Run one job to its end; return the exit code `vmjob run` should exit with.

    `write` gets the job's stdout and stderr as text, as it arrives (chunks, not lines);
    `note` gets vmjob's own one-line messages."""
    validate(job)
    image = resolve_image(config.spool, job.image)
    start_event_loop()  # before connecting: the guest's end comes as a lifecycle event
    reached = connect_hosts(config, job.request.host)
    for name, error in reached.errors.items():
        note(f"{error}; not placing on {name}")
    conns, hosts = reached.conns, reached.hosts
    store = Store(config.state_db)
    try:
        for reaped in reap_abandoned(store, conns):
            note(f"job {reaped}: its vmjob process had died; guest stopped, reservation freed")
        job_id = new_job_id()
        user = pwd.getpwuid(os.getuid()).pw_name
        spec = {
            "argv": list(job.argv), "env": job.env, "image": image.id,
            "input": str(job.input_dir) if job.input_dir else None,
            "output": str(job.output_dir) if job.output_dir else None,
            "time_limit": job.timeout_s, "runner": _runner_identity(),
        }
        with store.reserving():
            decision = snapshot(store, hosts).place(job.request)
            if decision.allocation is None:
                raise DoesNotFit(decision.explanation.summary)
            allocation = decision.allocation
            store.add_job(
                JobRecord(id=job_id, owner=user, uid=os.getuid(), state=JobState.PLACED,
                          spec=spec),
                job.request, allocation, f"placed: {describe_allocation(allocation)}",
            )
        note(f"job {job_id} on {allocation.host}: {describe_allocation(allocation)}")
        return _launch_and_follow(config, store, conns[allocation.host], job, job_id, user,
                                  allocation, image, write, note)
    finally:
        store.close()
        reached.close()
        poke_daemon(config.socket)


def poke_daemon(socket_path: Path) -> None:
    """Tell a daemon on this store (if one answers) that cores were freed behind its back.

    A daemon started while this direct run went on sees the run's reservation in the store
    and waits for it; nothing else would wake its scheduler when the run releases it.
    Best effort: no daemon, no harm.
    """
    if not socket_path.exists():
        return
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        with sock:
            sock.connect(str(socket_path))
            sock.sendall(b"POST /v1/wake HTTP/1.1\r\nHost: vmjobs\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            sock.recv(512)
    except OSError:
        pass


def describe_allocation(alloc: Allocation) -> str:
    """One line: cpus, nodes, memory and NICs (also kept in the job's PLACED event)."""
    nodes = ", ".join(f"node{s.node}" for s in alloc.nodes)
    text = f"cpus {','.join(map(str, alloc.cpus))} ({nodes}), {alloc.memory_mib} MiB"
    if alloc.devices:
        text += f", NICs {', '.join(alloc.devices)}"
    return text


def _launch_and_follow(config: Config, store: Store, conn: Connection, job: RunRequest,
                       job_id: str, user: str, allocation: Allocation, image: Any,
                       write: Callable[[str], None], note: Callable[[str], None]) -> int:
    files = JobFiles.of(config.spool, job_id)
    host_config = config.host(allocation.host)
    dom = None
    with interruptible():
        try:
            virt_type = probe.virt_type(config, host_config, conn, image, allocation,
                                        note)
            plan = GuestPlan(
                job_id=job_id, owner=user, owner_uid=os.getuid(), argv=job.argv,
                env=job.env, allocation=allocation, image=image, virt_type=virt_type,
                output_disk_mib=config.output_disk_mib, input_dir=job.input_dir,
                emulator_cpus=host_config.reserved_cpus,
            )
            dom, _how = template.launch(
                config.start, conn, plan, files, config.spool, note,
                lambda how: store.transition(job_id, JobState.STARTING,
                                             f"starting ({virt_type}, {how})"))
        except BaseException as exc:
            # Nothing ran: leave no trace of the job at all.
            destroy_quietly(dom)
            store.delete_job(job_id)
            shutil.rmtree(files.dir, ignore_errors=True)
            if isinstance(exc, VirtError):
                raise VmjobsError(
                    f"host {allocation.host} refused to start the guest: "
                    f"{exc.get_error_message()}"
                ) from None
            if isinstance(exc, Interrupted):
                note(f"job {job_id} cancelled before it started")
                return EXIT_SIGINT if exc.signum == signal.SIGINT else EXIT_SIGTERM
            raise
        try:
            store.transition(job_id, JobState.RUNNING, "guest started")
            return _follow(store, conn, dom, job, job_id, allocation, files, write, note)
        except Interrupted as exc:
            destroy_quietly(dom)
            name = "SIGINT" if exc.signum == signal.SIGINT else "SIGTERM"
            store.transition(job_id, JobState.CANCELLED, f"{name}: guest destroyed", release=True)
            note(f"job {job_id} cancelled ({name}); guest destroyed, reservation released")
            return EXIT_SIGINT if exc.signum == signal.SIGINT else EXIT_SIGTERM
        except sqlite3.OperationalError as exc:  # the store is full or unwritable
            destroy_quietly(dom)
            raise VmjobsError(
                f"job {job_id}: its end could not be recorded in {config.state_db} ({exc}); "
                "its guest is stopped and its reservation is freed by the next vmjob run or "
                "the daemon once there is room (this process, which held it, is gone)"
            ) from None
        except BaseException as exc:
            destroy_quietly(dom)
            store.transition(job_id, JobState.FAILED, f"vmjob failed: {exc}", release=True)
            raise


def _follow(store: Store, conn: Connection, dom: Domain, job: RunRequest, job_id: str,
            allocation: Allocation, files: JobFiles, write: Callable[[str], None],
            note: Callable[[str], None]) -> int:
    deadline = time.monotonic() + job.timeout_s if job.timeout_s else None
    # a character split across two reads is completed by the next one, never replaced
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    guest = GuestEnd(conn, dom, files)
    try:
        for chunk in follow_output(files, guest, deadline=deadline):
            if chunk:
                text = decoder.decode(chunk)
                if text:
                    write(text)
            if deadline is not None and time.monotonic() >= deadline and not guest.ended():
                destroy_quietly(dom)
                reason = f"timed out after {_seconds(job.timeout_s)}; guest stopped"
                store.transition(job_id, JobState.TIMEOUT, reason, release=True)
                note(f"job {job_id} {reason}")
                return EXIT_TIMEOUT
        tail = decoder.decode(b"", final=True)
        if tail:
            write(tail)
        return _collect(store, job, job_id, files, allocation.host, note, guest)
    finally:
        guest.close()


def _seconds(value: float | None) -> str:
    return f"{value:g}s"


# How long QEMU may take to go away after the guest powered itself off before it is
# destroyed (it exits within milliseconds; this machine's PID 1 reaps it 1.5-2 s late).
GONE_AFTER_POWER_OFF_S = 30.0


def _collect(store: Store, job: RunRequest, job_id: str, files: JobFiles, host: str,
             note: Callable[[str], None], guest: GuestEnd) -> int:
    """The guest powered off (or stopped): read its verdict and its output, record the end
    now, and free its cores once QEMU is gone (as the daemon does)."""
    verdict = collect(files, host)
    gone = guest.stopped.is_set()
    if verdict.exit_code is None:
        store.transition(job_id, verdict.state, verdict.reason, release=gone)
        note(f"job {job_id}: {verdict.reason}")
        code = EXIT_VMJOB_FAILED
    else:
        if job.output_dir is not None and files.out.exists():
            shutil.copytree(files.out, job.output_dir, dirs_exist_ok=True)
        store.transition(job_id, verdict.state, verdict.reason, release=gone,
                         exit_code=verdict.exit_code)
        code = verdict.exit_code
    if not gone:
        try:
            stopped = guest.wait_stopped(GONE_AFTER_POWER_OFF_S)
        except (Interrupted, VirtError):
            # the end is recorded: a Ctrl+C or a lost connection now only hurries QEMU away
            stopped = False
        if not stopped:
            destroy_quietly(guest.dom)
        store.release(job_id)
    return code
