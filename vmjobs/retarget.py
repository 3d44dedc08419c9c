"""A guest's domain XML for another place: the same guest (same ABI) pinned, bound and wired
to files as an allocation says.

`retarget_xml` serves a live migration's destination, a checkpoint's restore and a job
restored from a warm-start template (vmjobs/template.py): `<cputune>` and `<numatune>` rebuilt
from the allocation with `domain_xml`'s own builders (pinning is recomputed, never copied),
the `<metadata>` allocation replaced, the console and the output port moved to the given
files. Everything else is kept; an allocation whose NUMA split would change the guest's NUMA
cells is refused. Pure: no libvirt, no I/O.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from placement import Allocation
from vmjobs import domain_xml
from vmjobs.errors import VmjobsError

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
    if vcpus is None or int(vcpus.text or "0") != len(alloc.cpus):
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
