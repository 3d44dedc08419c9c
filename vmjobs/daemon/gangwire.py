"""The daemon's side of gang networks and vmjob-ctl: where a gang member's life meets them.

A member is a job whose stored spec says its gang (`vmjobs.gang.gang_of`). The core calls:

- `member_plan_for` when it writes a member's guest (`Daemon._start_guest`): the gang's
  network is made on first use, from every member's reservation (a gang is placed all or
  none, so every member has its host when the first one starts), its control state opened,
  and the member's plan gets its NIC, /vmjob/net, vmjob-ctl and control port;
- `member_running` once the guest runs (launch, recovery, after a move): its control port is
  attached (again);
- `member_ended` when a member's end is recorded: a failure (`gang.is_failure`) poisons the
  gang's barriers, batons and kv waits at once, naming the member (a failed member's init
  has usually poisoned them already, over its port, as its job exited: `failed_first`);
- `gang_ended` (a `gang.GangHooks.ended` hook) once every member has ended: the control
  state is closed and the network removed.

Network work (`ip` commands, maybe over SSH) never runs under the daemon's lock: the first
member's launch thread makes the network, the others wait for it (per-gang lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmjobs import gang, gangnet
from vmjobs.control import MemberInfo
from vmjobs.gangmember import member_plan
from vmjobs.guest import GuestPlan
from vmjobs.jobs import JobRecord, JobState, domain_name
from vmjobs.virt import VirtError

if TYPE_CHECKING:
    from vmjobs.daemon.core import Daemon

log = logging.getLogger("vmjobs.daemon")
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def gang_ref(record: JobRecord) -> tuple[str, int] | None:
    """(gang id, index) of a member's record; None for a job of no gang."""
    ref = gang.gang_of(record.spec)
    return (ref.gang_id, ref.index) if ref is not None else None


def _gang_lock(gang_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(gang_id, threading.Lock())


def ensure_network(daemon: Daemon, gang_id: str) -> gangnet.GangNet:
    """The gang's network, made if it has none yet, and its control state opened.
    Raises GangNetError (the member then fails to start, with the reason)."""
    with _gang_lock(gang_id):
        net = gangnet.find(daemon.config.spool, gang_id)
        with daemon.lock:
            members = [(m.index, m.host or "") for m in gang.members(daemon.store, gang_id)]
        if net is None or sorted((m.index, m.host) for m in net.members) != sorted(members):
            if any(not host for _i, host in members):
                raise gangnet.GangNetError(f"gang {gang_id}: a member has no host yet")
            net = gangnet.create(daemon.config.spool, gangnet.host_nets(daemon.config),
                                 gang_id, members)
            log.info("gang %s: network %s (VNI %d) on %s", gang_id, net.subnet, net.vni,
                     ", ".join(net.hosts()))
        daemon.control.open_gang(gang_id, {m.index: MemberInfo(m.host, net.address(m.index))
                                           for m in net.members})
        return net


def open_control(daemon: Daemon, gang_id: str) -> bool:
    """Open the gang's control state (from the store after a daemon restart) if the gang has
    its network; False if it has none (not started yet, or ended)."""
    net = gangnet.find(daemon.config.spool, gang_id)
    if net is None:
        return False
    daemon.control.open_gang(gang_id, {m.index: MemberInfo(m.host, net.address(m.index))
                                       for m in net.members})
    return True


def member_plan_for(daemon: Daemon, record: JobRecord, plan: GuestPlan) -> GuestPlan:
    """`plan` as a gang member's (unchanged for a job of no gang)."""
    ref = gang_ref(record)
    if ref is None:
        return plan
    net = ensure_network(daemon, ref[0])
    return member_plan(plan, net, ref[1], daemon.config.spool)


def member_running(daemon: Daemon, record: JobRecord, host: str) -> None:
    """Attach the member's control port on `host` (after a start or a move). Never raises: a
    port that cannot be opened is logged (vmjob-ctl keeps asking; the next attach serves it)."""
    ref = gang_ref(record)
    if ref is None:
        return
    conn = daemon.hosts.conn(host)
    if conn is None:
        return
    open_control(daemon, ref[0])  # after a daemon restart: its control state, from the store
    daemon.control.member_state(ref[0], ref[1], "running", host=host)
    try:
        daemon.control.attach(ref[0], ref[1], conn, domain_name(record.id))
    except (VirtError, Exception) as exc:  # noqa: BLE001 - logged, never fatal to the job
        message = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
        log.warning("job %s: its control port could not be opened: %s", record.id, message)


def member_ended(daemon: Daemon, job_id: str, state: JobState, exit_code: int | None,
                 spawn: Callable[..., None]) -> None:
    """A member's end is recorded. Caller holds the daemon's lock: the network's removal goes
    to a thread (`spawn`)."""
    record = daemon.store.job(job_id)
    ref = gang_ref(record) if record is not None else None
    if ref is None:
        return
    gang_id, index = ref
    if record is not None and record.spec.get(gang.KEY_STOPPED_BY) is not None:
        return  # stopped by the gang for another member's failure: that one poisoned it
    if gang.is_failure(state, exit_code):
        why = f"exit status {exit_code}" if exit_code is not None else state.value.lower()
        # on a thread: answering the waiters writes to their ports (libvirt calls), which
        # must not happen under the daemon's lock
        spawn(daemon.control.member_failed, gang_id, index, why,
              name=f"gang-poison-{gang_id}")
    else:
        daemon.control.member_state(gang_id, index, "completed")


def failed_first(daemon: Daemon, record: JobRecord) -> str | None:
    """The member whose init reported a failed exit over its control port and whose end is
    not recorded yet, if `record`'s member is another that had not reported first: a failure
    of `record`'s member now is that one's consequence (its barrier was poisoned), not the
    gang's first failure. That member's end follows within seconds (its guest is powering
    off). None otherwise. Caller holds the daemon's lock."""
    ref = gang_ref(record)
    if ref is None:
        return None
    for index in daemon.control.exits_reported(ref[0]):  # in the order they were reported
        if index == ref[1]:
            return None  # it reported its own failure before any other unfinished one did
        other = daemon.store.job(gang.member_id(ref[0], index))
        if other is not None and not other.state.finished:
            return other.id
    return None


def gang_ended(daemon: Daemon, gang_id: str, spawn: Callable[..., None]) -> None:
    """Every member has ended (the core's `gang_hooks.ended`): the control state is closed,
    the network removed (on a thread). Idempotent."""
    daemon.control.close_gang(gang_id)
    if gangnet.find(daemon.config.spool, gang_id) is not None:
        spawn(remove_network, daemon, gang_id, name=f"gangnet-remove-{gang_id}")


def remove_network(daemon: Daemon, gang_id: str) -> None:
    with _gang_lock(gang_id):
        try:
            if gangnet.remove(daemon.config.spool, gangnet.host_nets(daemon.config), gang_id):
                log.info("gang %s: network removed", gang_id)
        except gangnet.GangNetError as exc:
            log.warning("gang %s: network not removed (recovery's sweep retries): %s",
                        gang_id, exc)
    with _locks_guard:
        _locks.pop(gang_id, None)


def member_moving(daemon: Daemon, record: JobRecord, destination: str, keep: str) -> None:
    """Before a member's migration to `destination`: its gang's network is made there, `keep`
    (the source) keeps its own until the move is settled. Raises GangNetError (the move fails
    before the copy)."""
    ref = gang_ref(record)
    if ref is not None:
        with _gang_lock(ref[0]):
            gangnet.move(daemon.config.spool, gangnet.host_nets(daemon.config), ref[0], ref[1],
                         destination, keep=[keep])


def member_settled(daemon: Daemon, record: JobRecord, host: str) -> None:
    """After a member's move (done or failed): it runs on `host`; the network is only where
    members are. Never raises (logged; the recovery's sweep removes what is left)."""
    ref = gang_ref(record)
    if ref is None:
        return
    with _gang_lock(ref[0]):
        try:
            gangnet.move(daemon.config.spool, gangnet.host_nets(daemon.config), ref[0], ref[1],
                         host)
        except gangnet.GangNetError as exc:
            log.warning("job %s: its gang network after the move: %s", record.id, exc)
    daemon.control.member_state(ref[0], ref[1], "running", host=host)


def members_placed(daemon: Daemon, gang_id: str, hosts: dict[int, str]) -> dict[int, str]:
    """Before members are restored (`hosts`: index -> its new host): the gang's network is
    made there (`gangnet.relocate`; a host left without members loses it). Returns where
    those members were, to put the network back if the restore fails (`members_placed` again
    with it). Raises GangNetError."""
    with _gang_lock(gang_id):
        net = gangnet.find(daemon.config.spool, gang_id)
        if net is None:
            raise gangnet.GangNetError(f"gang {gang_id} has no network")
        before = {m.index: m.host for m in net.members if m.index in hosts}
        gangnet.relocate(daemon.config.spool, gangnet.host_nets(daemon.config), gang_id, hosts)
    for index, host in hosts.items():
        daemon.control.member_state(gang_id, index, "restoring", host=host)
    return before


def members_back(daemon: Daemon, gang_id: str, hosts: dict[int, str]) -> None:
    """A restore failed: the network goes back to where it was (`hosts`, what
    `members_placed` returned). Never raises (logged; the recovery's sweep removes what is
    left)."""
    try:
        with _gang_lock(gang_id):
            gangnet.relocate(daemon.config.spool, gangnet.host_nets(daemon.config), gang_id,
                             hosts)
    except gangnet.GangNetError as exc:
        log.warning("gang %s: its network after a failed restore: %s", gang_id, exc)
    for index in hosts:
        daemon.control.member_state(gang_id, index, "checkpointed")


def member_checkpointed(daemon: Daemon, record: JobRecord) -> None:
    """The member is saved: `vmjob-ctl nodes` says so (its network stays, for its restore)."""
    ref = gang_ref(record)
    if ref is not None:
        daemon.control.member_state(ref[0], ref[1], "checkpointed")
