"""Live migration through libvirt, the way Nova's libvirt driver splits it.

- `retarget_xml`: a pure transform of a domain's migratable XML (or a save image's XML) for
  another host: `<cputune>` and `<numatune>` rebuilt from the destination's allocation with
  `domain_xml`'s own builders (pinning is recomputed, never copied), the `<metadata>`
  allocation replaced, the console moved to the destination's segment (`JobFiles.console`).
  Everything else (machine type, device addresses, output disk path) is kept, so the guest's
  ABI is unchanged; a destination whose NUMA split would change the guest's NUMA cells is
  refused.
- `migrate_domain`: one live migration driven through libvirt (`migrate3` with
  `VIR_MIGRATE_PARAM_DEST_XML`, LIVE, transient on the destination): a thin loop that polls
  `jobStats` and carries out what the pure `vmjobs.convergence.step` decides (start at the
  policy's max downtime and raise it in steps while the copy stalls, optionally a switch to
  post-copy; abort after a completion timeout scaled per GiB of guest memory, when no progress
  was made for `progress_timeout_s`, or when the caller asks). Needs no store: the smoke test
  and the benchmark use it against bare libvirt URIs.

The job-level operation (reserve, MIGRATING, move the reservation) is `vmjobs.migration`.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import libvirt

from placement import Allocation
from vmjobs import convergence, failpoints
from vmjobs.convergence import Policy
from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection, Domain, domain_xml

METADATA = f"{{{domain_xml.METADATA_NS}}}"


class MigrationFailed(VmjobsError):
    """The migration did not happen; the guest still runs on the source."""


# --- the XML for the destination ----------------------------------------------------------------

def _replace_child(parent: ET.Element, old_tag: str, new: ET.Element,
                   after: tuple[str, ...] = ()) -> None:
    old = parent.find(old_tag)
    if old is not None:
        index = list(parent).index(old)
        parent.remove(old)
        parent.insert(index, new)
        return
    children = list(parent)
    position = max((children.index(c) + 1 for c in children if c.tag in after), default=0)
    parent.insert(position, new)


def _cells(root: ET.Element) -> list[tuple[str, int]]:
    """The guest's NUMA cells as (vCPU list, MiB), as the XML declares them."""
    cells = []
    for cell in root.findall("./cpu/numa/cell"):
        memory = int(cell.get("memory", "0"))
        unit = cell.get("unit", "KiB")
        mib = memory // 1024 if unit == "KiB" else memory * 1024 if unit == "GiB" else memory
        cells.append((cell.get("cpus", ""), mib))
    return cells


def retarget_xml(xml: str, alloc: Allocation, emulator_cpus: frozenset[int],
                 console_log: Path | None, output_pipe: Path | None = None) -> str:
    """The same guest, pinned and bound as `alloc` says, for the host `alloc.host`; its
    console to `console_log` and its job output to `output_pipe` (`JobFiles.new_output`)."""
    root = ET.fromstring(xml)
    vcpus = root.find("vcpu")
    plugged = _plugged(root)
    if root.find("maxMemory") is not None:
        # a resizable guest (`vmjob resize`): one cell of every possible vCPU and its boot
        # memory, kept as it is; its online vCPUs pinned one to a cpu, and those a shrink
        # offlined but QEMU kept plugged confined to the job's cpus (`vcpu_cpusets`)
        if not 1 <= len(alloc.cpus) <= plugged or len(alloc.nodes) != 1:
            raise MigrationFailed(
                f"the destination allocation has {len(alloc.cpus)} cpus on "
                f"{len(alloc.nodes)} NUMA nodes; the resizable guest has {plugged} vCPUs "
                "plugged in one cell")
        _replace_child(root, "cputune", domain_xml.cputune(alloc, emulator_cpus, plugged),
                       after=("vcpu", "iothreads"))
        return _retargeted(root, alloc, console_log, output_pipe)
    if vcpus is None or plugged != len(alloc.cpus):
        raise MigrationFailed(f"the destination allocation has {len(alloc.cpus)} cpus; the "
                              f"guest has {vcpus.text if vcpus is not None else '?'} vCPUs")
    wanted = [(domain_xml.format_cpu_list(v), mib) for v, mib in domain_xml.guest_cells(alloc)]
    if _cells(root) != wanted:
        raise MigrationFailed(
            f"on {alloc.host} the job's memory and cpus would split over NUMA nodes "
            f"{[s.node for s in alloc.nodes]} differently from the guest's NUMA cells; "
            "the guest's topology cannot change while it runs"
        )
    _replace_child(root, "cputune", domain_xml.cputune(alloc, emulator_cpus),
                   after=("vcpu", "iothreads"))
    return _retargeted(root, alloc, console_log, output_pipe)


def _plugged(root: ET.Element) -> int:
    """The vCPUs a guest's XML has plugged (`<vcpu current>`, else all of them)."""
    vcpus = root.find("vcpu")
    if vcpus is None:
        return 0
    return int(vcpus.get("current", vcpus.text or "0"))


def _retargeted(root: ET.Element, alloc: Allocation, console_log: Path | None,
                output_pipe: Path | None) -> str:
    """The rest of `retarget_xml` once `<cputune>` is in: numatune, metadata, files."""
    _replace_child(root, "numatune", domain_xml.numatune(alloc), after=("cputune",))
    job = root.find(f"./metadata/{METADATA}job")
    if job is not None:
        old = job.find(f"{METADATA}allocation")
        if old is not None:
            job.remove(old)
        job.append(domain_xml.allocation_element(alloc))
    if console_log is not None:
        for tag in ("serial", "console"):
            for device in root.findall(f"./devices/{tag}[@type='file']"):
                source = device.find("source")
                if source is not None:
                    source.set("path", str(console_log))
    if output_pipe is not None:
        for device in root.findall("./devices/channel[@type='pipe']"):
            target, source = device.find("target"), device.find("source")
            if target is not None and source is not None \
                    and target.get("name") == domain_xml.OUTPUT_CHANNEL:
                source.set("path", str(output_pipe))
    return ET.tostring(root, encoding="unicode")


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
    dom: Domain | None = field(default=None, compare=False)  # on the destination


def migration_uri(dest_libvirt_uri: str) -> str | None:
    """Where QEMU should send the guest: the destination's address, taken from its libvirt
    URI (the destination's own hostname may not resolve from the source)."""
    host = urlparse(dest_libvirt_uri).hostname
    return f"tcp://{host}" if host else None


def _stat(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) else 0


def migrate_domain(dom: Domain, dconn: Connection, dest_xml: str,
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
    dest_dom: Domain = result["dom"]
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


def migratable_xml(dom: Domain) -> str:
    """The running guest's XML as a destination may take it (`VIR_DOMAIN_XML_MIGRATABLE`)."""
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)


def landed(dconn: Connection, name: str) -> bool:
    """Whether domain `name` runs on the destination `dconn` (a migration that reported an
    error may still have moved the guest); False when libvirt cannot say."""
    try:
        dom = dconn.lookupByName(name)
        return bool(dom.isActive()) and dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError:
        return False
