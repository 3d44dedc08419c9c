"""The daemon's side of `vmjob-ctl resize` (vmjobs/guestresize.py): where a resizable job's
life meets its control port, with the config's `resize_from_guest: on`.

- `plan_for` when its guest is written (`Daemon._start_guest`): a resizable job of no gang
  gets the control port and /vmjob/bin/vmjob-ctl (gang members' ports are the gangs');
- `running` once its guest runs (start, after a move, at recovery): the port is opened
  (again) and its lines go to `Daemon.guest_resizes`;
- what a request does (`Daemon.guest_resize`, wired in by `daemon.main`): the same as
  `POST /v1/jobs/{id}/resize` by the job's owner (loans given back first, then
  `moves.resize`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from vmjobs.control import MAX_LINE
from vmjobs.daemon import gangwire
from vmjobs.gangmember import vmjob_ctl
from vmjobs.guest import GuestPlan
from vmjobs.jobs import JobRecord, domain_name
from vmjobs.virt import VirtError
from vmjobs.virt.ctlport import ControlPort

if TYPE_CHECKING:
    from vmjobs.daemon.core import Daemon

log = logging.getLogger("vmjobs.daemon")


def serves(daemon: Daemon, record: JobRecord) -> bool:
    """Whether `record`'s guest may ask to be resized (its port served here)."""
    return daemon.config.resize_from_guest and gangwire.gang_ref(record) is None


def plan_for(daemon: Daemon, record: JobRecord, plan: GuestPlan) -> GuestPlan:
    """`plan` with the control port and vmjob-ctl when the job may resize itself."""
    if plan.hotplug is None or not serves(daemon, record):
        return plan
    ctl = vmjob_ctl(daemon.config.spool).read_bytes()
    return replace(plan, control_channel=True,
                   extra_files={**plan.extra_files, "vmjob/bin/vmjob-ctl": (ctl, 0o755)})


def running(daemon: Daemon, record: JobRecord, host: str) -> None:
    """Open the job's control port on `host`. Never raises: a guest without the port (not
    resizable, or started before the setting) or one that cannot be opened is logged."""
    conn = daemon.hosts.conn(host)
    if conn is None or not serves(daemon, record):
        return
    job_id = record.id
    port: list[ControlPort] = []

    def reply(line: str) -> None:
        if port and not port[0].send(line):
            log.info("job %s: its control port closed before an answer", job_id)

    def on_closed() -> None:
        with daemon.lock:
            if job_id not in daemon.active:
                daemon.guest_resizes.forget(job_id)

    try:
        port.append(ControlPort(conn, domain_name(job_id),
                                lambda line: daemon.guest_resizes.request(job_id, line, reply),
                                on_closed, MAX_LINE))
    except VirtError as exc:
        log.info("job %s: no control port for vmjob-ctl resize: %s", job_id,
                 exc.get_error_message())

