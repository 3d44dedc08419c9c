"""Growing and shrinking a running job in place: vCPU hotplug and virtio-mem memory, with the
store's reservation and the guest's pinning kept in step (`vmjob resize`).

Order, so that a core or a MiB is never used by two jobs:

1. Reserve first: in one store transaction, the engine (`placement.resize`, on a snapshot)
   checks the job's node has the cpus and memory the grown parts need, and the job's
   reservation becomes the union of what it holds and what it grows into (the UNIQUE
   (host, cpu) key refuses a cpu someone took meanwhile). Nothing reserved: nothing touched.
2. Hotplug (`virt.hotplug`): memory first (the virtio-mem device's requested size, waited for
   until the guest has plugged or unplugged it), then vCPUs (new ones pinned to their
   reserved cpus; removed ones unplugged, or under TCG left plugged and confined to the cpus
   the job keeps: `hotplug.ShrinkWay`), then the guest init makes exactly its cpus 0..n-1
   online and says what it sees (`nproc`, MemTotal). A shrink goes on only once the guest
   says it has the new count.
3. Release last: the reservation becomes exactly the new size (cores a shrink freed go back
   to the pool only now: no vCPU thread can run there any more), and the domain's
   `<metadata>` allocation is rewritten.

A hotplug that fails puts back what it changed (the old vCPU count, the old memory) and the
old reservation; if putting back fails too, the union stays reserved (the guest may use it)
and the error says so.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import placement
from placement import Allocation
from vmjobs.codec import request_from_dict
from vmjobs.config import Config
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.jobs import domain_name
from vmjobs.migration import running_job
from vmjobs.snapshot import describe_allocation, snapshot
from vmjobs.store import Store
from vmjobs.virt import Connection, Domain, VirtError, domains, hotplug
from vmjobs.virt.conn import is_running, lookup_domain
from vmjobs.virt.domain_xml import VIRTIO_MEM_BLOCK_KIB
from vmjobs.virt.pinning import apply_live

BLOCK_MIB = VIRTIO_MEM_BLOCK_KIB >> 10


class ResizeFailed(VmjobsError):
    """The hotplug did not happen; the job runs on with its old size (the message says if
    anything could not be put back)."""


@dataclass(frozen=True)
class Resized:
    job_id: str
    host: str
    before: Allocation
    after: Allocation
    guest_cpus: int  # what the guest reports once it onlined its cpus
    guest_memtotal_kib: int
    vcpus: hotplug.VcpuChange = hotplug.VcpuChange.UNCHANGED  # which way the cpus changed


def resize_job(config: Config, store: Store, conns: Mapping[str, Connection],
               hosts: list[placement.Host], job_id: str, cpus: int | None,
               memory_mib: int | None) -> Resized:
    """Resize a RUNNING job to `cpus` vCPUs and `memory_mib` MiB (None: keep). Raises
    VmjobsError (nothing changed) when it cannot be resized that way, DoesNotFit when its
    node lacks the room, ResizeFailed when libvirt or the guest refused."""
    record, before = running_job(store, job_id)
    host = record.host or ""
    conn = conns.get(host)
    dom = lookup_domain(conn, domain_name(job_id)) if conn is not None else None
    if conn is None or dom is None or not is_running(dom):
        raise VmjobsError(f"job {job_id}'s guest is not running on {host}")
    try:
        now = hotplug.limits(domains.live_xml(dom))
    except hotplug.HotplugError as exc:
        raise VmjobsError(f"job {job_id} cannot be resized: {exc}") from None
    cpus = len(before.cpus) if cpus is None else cpus
    memory_mib = before.memory_mib if memory_mib is None else memory_mib
    extra = memory_mib - now.base_mib
    if not 1 <= cpus <= now.max_vcpus:
        raise VmjobsError(f"job {job_id}: its guest can have 1 to {now.max_vcpus} vCPUs, not "
                          f"{cpus}")
    if not 0 <= extra <= now.extra_max_mib or extra % BLOCK_MIB:
        raise VmjobsError(
            f"job {job_id}: its guest's memory can be {now.base_mib} MiB to "
            f"{now.base_mib + now.extra_max_mib} MiB in steps of {BLOCK_MIB} MiB, not "
            f"{memory_mib} MiB")
    if cpus == len(before.cpus) and memory_mib == before.memory_mib:
        raise VmjobsError(f"job {job_id} already has {cpus} cpus and {memory_mib} MiB")
    # 1. reserve what it grows into
    try:
        with store.reserving():
            union = _fitted(store, hosts, job_id, max(cpus, len(before.cpus)),
                            max(memory_mib, before.memory_mib))
            if union != before:
                store.repin_reservation(job_id, union, f"resize: reserved "
                                        f"{describe_allocation(union)} before the hotplug")
    except sqlite3.IntegrityError:
        raise DoesNotFit(f"job {job_id}: a cpu it would grow into was just taken; try "
                         "again") from None
    after = _shrunk(union, cpus, memory_mib)
    # 2. hotplug
    done: list[str] = []  # what took effect, to be undone on failure
    way = hotplug.ShrinkWay.for_virt_type(now.virt_type)
    change = hotplug.VcpuChange.UNCHANGED
    try:
        if extra != now.extra_requested_mib:
            _step(done, "memory", lambda: hotplug.set_extra_memory(dom, extra))
        if cpus != len(before.cpus):
            changes: list[hotplug.VcpuChange] = []
            _step(done, "cpus", lambda: changes.append(hotplug.set_vcpus(dom, after.cpus, way)))
            change = changes[0]
        seen_cpus, memtotal = hotplug.guest_view(conn, domain_name(job_id), cpus)
        if seen_cpus > cpus:  # its kernel has not let them go: their cores are not free
            raise hotplug.HotplugError(f"the guest still has {seen_cpus} cpus online")
    except (VirtError, VmjobsError) as exc:
        message = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
        back = _put_back(store, conn, dom, job_id, before, now, union, done, way)
        raise ResizeFailed(f"job {job_id}: resize failed: {message}; {back}") from None
    # 3. release what it shrank out of; later moves (migration, restore, a requeue) place it
    # at its new size
    request = replace(request_from_dict(record.request), cpus=cpus, memory_mib=memory_mib) \
        if record.request else None
    how = "" if change == hotplug.VcpuChange.UNCHANGED else f" (vCPUs {change})"
    store.repin_reservation(job_id, after, f"resized to {describe_allocation(after)}{how}; "
                            f"the guest sees {seen_cpus} cpus, MemTotal {memtotal >> 10} MiB",
                            request=request)
    try:
        apply_live(dom, after, config.host(host).reserved_cpus, nodes_changed=False)
    except VirtError as exc:  # the pins are right already; only the metadata may be stale
        store.note(job_id, f"resize: rewriting the guest's metadata failed: "
                           f"{exc.get_error_message()}")
    return Resized(job_id, host, before, after, seen_cpus, memtotal, change)


def _step(done: list[str], name: str, action: Callable[[], None]) -> None:
    """Run one hotplug step and note it in `done` once it may have changed the guest: libvirt
    refusing the request (VirtError) changed nothing; a guest that did not follow in time
    (HotplugError) may be half-way."""
    try:
        action()
    except hotplug.HotplugError:
        done.append(name)
        raise
    done.append(name)


def _fitted(store: Store, hosts: list[placement.Host], job_id: str, cpus: int,
            memory_mib: int) -> Allocation:
    decision = placement.resize(snapshot(store, hosts), job_id, cpus, memory_mib)
    if decision.allocation is None:
        raise DoesNotFit(f"job {job_id} cannot grow to {cpus} cpus and {memory_mib} MiB: "
                         f"{decision.reason}")
    return decision.allocation


def _shrunk(union: Allocation, cpus: int, memory_mib: int) -> Allocation:
    """The union allocation cut to `cpus` (its first ones: vCPU i keeps cpu i) and
    `memory_mib`."""
    kept = union.cpus[:cpus]
    return placement.Allocation(
        host=union.host, cpus=kept, memory_mib=memory_mib,
        nodes=(placement.NodeShare(union.nodes[0].node, tuple(sorted(kept)), memory_mib),),
        devices=union.devices)


def _put_back(store: Store, conn: Connection, dom: Domain, job_id: str, before: Allocation,
              now: hotplug.Limits, union: Allocation, done: list[str],
              way: hotplug.ShrinkWay) -> str:
    """After a failed hotplug: the old vCPUs and memory (those `done` changed), then the old
    reservation; what was done, in words."""
    seen = ""
    try:
        if "cpus" in done:
            hotplug.set_vcpus(dom, before.cpus, way)
            # a guest may have let a cpu go that its host never saw unplugged (vCPU unplug
            # under TCG here): online what it still has and say what it sees
            cpus, _mem = hotplug.guest_view(conn, domain_name(job_id), len(before.cpus))
            if cpus != len(before.cpus):
                seen = (f"; the guest now sees {cpus} of its {len(before.cpus)} cpus (it "
                        "released one its host did not take back)")
        if "memory" in done:
            hotplug.set_extra_memory(dom, now.extra_requested_mib)
    except (VirtError, VmjobsError) as exc:
        why = exc.get_error_message() if isinstance(exc, VirtError) else str(exc)
        store.note(job_id, f"resize failed and could not be undone ({why}); it keeps "
                           f"{describe_allocation(union)} reserved")
        return (f"putting the old size back failed too ({why}): it keeps "
                f"{describe_allocation(union)} reserved")
    store.repin_reservation(job_id, before, "resize failed: its old size and reservation "
                                            f"are back{seen}")
    return f"its old size and reservation are back{seen}"
