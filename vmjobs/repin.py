"""Re-pinning a running job on its own host: other cpus, or other NUMA nodes, without stopping it.

What libvirt 9.0 (QEMU driver) allows on a running guest, all with VIR_DOMAIN_AFFECT_LIVE:

- `pinVcpuFlags(vcpu, cpumap)` per vCPU and `pinEmulator(cpumap)`: new cpu affinity, at once
  (the vCPU threads' affinity and cgroup cpuset);
- `setNumaParameters({"numa_nodeset": ...})`: the domain's cgroup `cpuset.mems`, for
  `<numatune><memory mode='strict'>` only; the kernel migrates the guest's pages to the new
  nodes (cgroup v1: libvirt sets `cpuset.memory_migrate`; v2 always migrates). The guest's
  per-cell `<memnode>` bindings cannot change live, so a re-pin keeps the guest's NUMA cells
  (same vCPUs and memory per cell) and only maps them onto other host nodes;
- migrating to the same host is refused by libvirt ("Attempt to migrate guest to the same
  host"), so there is no localhost-migration fallback.

The store's reservation changes first (one transaction, so a conflict leaves it as it was);
if libvirt then refuses, the guest's old pinning and the old reservation are put back.
The domain's `<metadata>` is updated last, so recovery sees the allocation it runs with.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

from placement import Allocation
from placement.plans import moved_between_nodes
from vmjobs.config import Config
from vmjobs.errors import VmjobsError
from vmjobs.jobs import domain_name
from vmjobs.migration import running_job
from vmjobs.store import Store
from vmjobs.units import format_cpu_list
from vmjobs.virt import Connection, VirtError, domain_xml
from vmjobs.virt.conn import is_running, lookup_domain
from vmjobs.virt.pinning import apply_live


class RepinFailed(VmjobsError):
    """libvirt refused to re-pin; the job runs on as before."""


@dataclass(frozen=True)
class Repinned:
    job_id: str
    host: str
    before: Allocation
    after: Allocation
    memory_moved_mib: int  # memory that changed NUMA node


def same_cells(before: Allocation, after: Allocation) -> bool:
    """Whether the guest's NUMA cells (vCPU indices and MiB per cell) stay as they are."""
    return domain_xml.guest_cells(before) == domain_xml.guest_cells(after)


def repin_job(config: Config, store: Store, conns: Mapping[str, Connection],
              job_id: str, alloc: Allocation) -> Repinned:
    """Move a RUNNING job onto `alloc`, on the host it runs on, while it runs.

    Raises VmjobsError (nothing changed) when the job is not running there, `alloc` is on
    another host, has another vCPU count or other guest NUMA cells, or holds a cpu another
    job holds; RepinFailed when libvirt refuses (pinning and reservation put back).
    """
    record, before = running_job(store, job_id)
    host = record.host or ""
    if alloc.host != host:
        raise VmjobsError(f"job {job_id} runs on {host}; a re-pin stays on its host "
                          f"(asked for {alloc.host}: migrate it instead)")
    if len(alloc.cpus) != len(before.cpus) or not same_cells(before, alloc):
        raise VmjobsError(f"job {job_id}: a re-pin keeps the guest's {len(before.cpus)} vCPUs "
                          "and NUMA cells; the new allocation changes them")
    conn = conns.get(host)
    dom = lookup_domain(conn, domain_name(job_id)) if conn is not None else None
    if dom is None or not is_running(dom):
        raise VmjobsError(f"job {job_id}'s guest is not running on {host}")
    nodes_changed = [s.node for s in alloc.nodes] != [s.node for s in before.nodes]
    where = f"cpus {format_cpu_list(alloc.cpus)}, nodes " \
            f"{format_cpu_list(sorted({s.node for s in alloc.nodes}))}"
    try:
        store.repin_reservation(job_id, alloc, f"re-pinned on {host} to {where}")
    except sqlite3.IntegrityError:
        raise VmjobsError(f"job {job_id}: {where} on {host} are held by another job") from None
    emulator = config.host(host).reserved_cpus
    done: list[str] = []
    try:
        apply_live(dom, alloc, emulator, nodes_changed, done)
    except VirtError as exc:
        message = exc.get_error_message()
        back = "nothing had changed"
        if done:
            try:
                apply_live(dom, before, emulator, nodes_changed)
                back = "its old pinning is back"
            except VirtError as again:
                back = f"putting its old pinning back failed too: {again.get_error_message()}"
        store.repin_reservation(job_id, before, f"re-pin to {where} failed: {message}")
        raise RepinFailed(f"job {job_id}: libvirt refused the re-pin to {where}: {message}; "
                          f"{back}") from None
    return Repinned(job_id, host, before, alloc, moved_between_nodes(before, alloc))
