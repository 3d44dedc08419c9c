"""A running guest's pinning: read it, and change it live (`VIR_DOMAIN_AFFECT_LIVE`).

`vmjobs.repin` decides what to pin where and keeps the store in step; this is the libvirt
side: vCPU and emulator pinning, the memory nodeset and the allocation in `<metadata>`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

import libvirt

from placement import Allocation
from vmjobs.units import format_cpu_list
from vmjobs.virt import Domain, domain_xml

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE


def pinning_of(dom: Domain) -> tuple[frozenset[int], ...]:
    """The host cpus each vCPU of a running guest may run on, as libvirt reports them."""
    return tuple(frozenset(i for i, on in enumerate(row) if on) for row in dom.vcpuPinInfo(0))


def cpumap(cpus: Iterable[int], host_cpus: int) -> tuple[bool, ...]:
    """libvirt's cpu map: one flag per host cpu id, 0 .. host_cpus - 1."""
    wanted = set(cpus)
    return tuple(i in wanted for i in range(host_cpus))


def apply_live(dom: Domain, alloc: Allocation, emulator_cpus: frozenset[int],
               nodes_changed: bool, done: list[str] | None = None) -> None:
    """Pin the running guest as `alloc` says (vCPUs still plugged beyond its cpus confined to
    them: `domain_xml.vcpu_cpusets`) and rewrite its metadata's allocation; raises VirtError
    on the first refusal. `done` collects the steps that took effect."""
    done = [] if done is None else done
    host_cpus = dom.connect().getCPUMap(0)[0]
    plugged = int(dom.vcpusFlags(LIVE))
    for vcpu, cpus in enumerate(domain_xml.vcpu_cpusets(alloc.cpus, plugged)):
        dom.pinVcpuFlags(vcpu, cpumap(cpus, host_cpus), LIVE)
        done.append(f"vcpu{vcpu}")
    dom.pinEmulator(cpumap(emulator_cpus or alloc.cpus, host_cpus), LIVE)
    done.append("emulator")
    if nodes_changed:
        nodeset = format_cpu_list(sorted({s.node for s in alloc.nodes}))
        dom.setNumaParameters({libvirt.VIR_DOMAIN_NUMA_NODESET: nodeset}, LIVE)
        done.append("nodeset")
    # libvirt hands the element out and takes it back without its namespace (it applies
    # `uri` to the element and its children itself), so it is edited in plain names here.
    job = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                     domain_xml.METADATA_NS, LIVE))
    for old in job.findall("allocation"):
        job.remove(old)
    job.append(_plain(domain_xml.allocation_element(alloc)))
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ET.tostring(job, encoding="unicode"),
                    "vmjob", domain_xml.METADATA_NS, LIVE)
    done.append("metadata")


def _plain(element: ET.Element) -> ET.Element:
    """`element` and its children with the namespace taken off their tags."""
    for node in element.iter():
        node.tag = node.tag.rpartition("}")[2]
    return element


# A borrower's CPU weight (cgroup cpu.shares; the default is 1024): on a core it shares with
# an owner that wants it back, the owner gets ~99.8% of it until the borrower has moved.
BORROWER_CPU_SHARES = 2
DEFAULT_CPU_SHARES = 1024  # every other guest's


def set_cpu_shares(dom: Domain, shares: int) -> None:
    """The running guest's CPU weight against other guests, live (libvirt's `cpu_shares`
    scheduler parameter: cgroup v1 cpu.shares, v2 cpu.weight). Not kept by a migration or
    restore (the new QEMU process gets its XML's default). VirtError if libvirt refuses."""
    dom.setSchedulerParametersFlags({"cpu_shares": shares}, LIVE)
