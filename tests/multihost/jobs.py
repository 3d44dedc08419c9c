"""Jobs for the multi-host tests, started and finished with the pieces `vmjob run` uses.

The daemon will own a migrated job's life; until its endpoints exist these helpers do what
`vmjob run` does (place and reserve in one transaction, prepare the job's files, start a
transient guest) but return at once, and `finish` collects the job wherever its record says
it runs now, as the daemon will after a migration or a restore.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt

from placement import Allocation, Request
from vmjobs import guest_protocol
from vmjobs.codec import allocation_from_dict
from vmjobs.config import Config
from vmjobs.errors import DoesNotFit
from vmjobs.guest import GuestPlan, JobFiles, OutputReader, prepare
from vmjobs.image import resolve_image
from vmjobs.jobs import TRANSITIONS, JobRecord, JobState, domain_name, new_job_id
from vmjobs.snapshot import snapshot
from vmjobs.store import Store
from vmjobs.virt.conn import Reached, connect_hosts, is_running, lookup_domain


@dataclass(frozen=True)
class Started:
    job_id: str
    allocation: Allocation


def start_job(config: Config, store: Store, reached: Reached, argv: list[str], host: str,
              memory_mib: int = 128, nics: int = 0, job_id: str | None = None,
              plan_hook: Callable[[GuestPlan], GuestPlan] | None = None) -> Started:
    """`plan_hook`: changes the guest's plan before its files are written (a gang member's
    network and control port, vmjobs/gangmember.py)."""
    request = Request(cpus=1, memory_mib=memory_mib, host=host, nics=nics)
    job_id = job_id or new_job_id()
    with store.reserving():
        decision = snapshot(store, reached.hosts).place(request)
        if decision.allocation is None:
            raise DoesNotFit(decision.explanation.summary)
        alloc = decision.allocation
        # the request is stored without the host: a move may go anywhere
        store.add_job(JobRecord(id=job_id, owner="root", uid=0, state=JobState.PLACED,
                                spec={"argv": argv}),
                      replace(request, host=None), alloc, "placed")
    image = resolve_image(config.spool, "default")
    files = JobFiles.of(config.spool, job_id)
    plan = GuestPlan(job_id=job_id, owner="root", owner_uid=0, argv=tuple(argv), env={},
                     allocation=alloc, image=image, virt_type="qemu", output_disk_mib=16,
                     emulator_cpus=config.host(host).reserved_cpus)
    xml = prepare(plan_hook(plan) if plan_hook is not None else plan, files)
    store.transition(job_id, JobState.STARTING, "starting")
    try:
        reached.conns[host].createXML(xml, 0)
    except libvirt.libvirtError:
        store.transition(job_id, JobState.FAILED, "could not start", release=True)
        raise
    store.transition(job_id, JobState.RUNNING, "guest started")
    return Started(job_id, alloc)


def output_text(spool: Path, job_id: str, last_only: bool = False) -> str:
    """The job's own output (its output files, in order; `last_only`: the current guest
    process's file only)."""
    files = JobFiles.of(spool, job_id)
    if last_only:
        indexes = files.output_indexes()
        return files.output(indexes[-1]).read_text(errors="replace") if indexes else ""
    reader = OutputReader(files)
    chunks = []
    while chunk := reader.read(final=True):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def console_text(spool: Path, job_id: str, hosts: list[str]) -> str:
    """The hosts' console segments (kernel, init, markers), then the job's own output."""
    files = JobFiles.of(spool, job_id)
    parts = []
    for host in hosts:
        path = files.console(host)
        if path.exists():
            parts.append(path.read_text(errors="replace"))
    return "".join(parts) + output_text(spool, job_id)


def job_lines(spool: Path, job_id: str) -> list[str]:
    return output_text(spool, job_id).splitlines()


def wait_for_line(spool: Path, job_id: str, hosts: list[str], needle: str,
                  timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in console_text(spool, job_id, hosts):
            return
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared in job {job_id}'s console")


def finish(config: Config, store: Store, reached: Reached, job_id: str,
           timeout_s: float = 120) -> JobRecord:
    """Wait for the guest to stop where the job runs now, then collect it like `vmjob run`."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = store.job(job_id)
        assert record is not None
        dom = lookup_domain(reached.conns[record.host or ""], domain_name(job_id))
        if dom is None or not is_running(dom):
            break
        if time.monotonic() > deadline:
            dom.destroy()
            store.transition(job_id, JobState.TIMEOUT, "test timeout", release=True)
            raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")
        time.sleep(0.2)
    files = JobFiles.of(config.spool, job_id)
    result = guest_protocol.read_output(files.output_disk, files.out)
    state = JobState.COMPLETED if result.exit_code == 0 else JobState.FAILED
    store.transition(job_id, state, f"exit status {result.exit_code}", release=True,
                     exit_code=result.exit_code)
    record = store.job(job_id)
    assert record is not None
    return record


def connect(config: Config) -> Reached:
    return connect_hosts(config)


def allocation_of(store: Store, job_id: str) -> Allocation | None:
    record = store.job(job_id)
    return allocation_from_dict(record.allocation) if record and record.allocation else None


def destroy_all(reached: Reached) -> None:
    """Destroy every job guest on every host still reachable (a test may have killed one)."""
    for conn in reached.conns.values():
        with contextlib.suppress(libvirt.libvirtError):
            for dom in conn.listAllDomains():
                if dom.name().startswith("vmjob-"):
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()


def host_pid() -> int:
    return os.getpid()


def end_all(store: Store, reached: Reached) -> None:
    """After a test, whatever happened: no guest runs and the store holds nothing."""
    destroy_all(reached)
    for record in store.jobs():
        if JobState.CANCELLED in TRANSITIONS[record.state]:
            store.transition(record.id, JobState.CANCELLED, "test over", release=True)
        elif not record.state.finished:  # cut short mid-move (or a placeholder): forget it
            store.delete_job(record.id)
