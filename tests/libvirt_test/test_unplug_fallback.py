"""A vCPU shrink QEMU cannot carry out (TCG: vmjobs/virt/hotplug.py says why) without a
hypervisor: the rule that confines a vCPU left plugged to the job's remaining cores
(`domain_xml.vcpu_cpusets`), the way chosen per domain type, `hotplug.set_vcpus` on libvirt's
test driver (plug, confine, online again, unplug), and the XML a migration or restore of such
a guest gets (`retarget_xml`: vcpu current kept, the confined vCPU pinned to the new cores),
which libvirt's test driver takes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from placement import Allocation, NodeShare
from tests.libvirt_test.domain_specs import SPECS
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.virt import hotplug
from vmjobs.virt.domain_xml import Hotplug, build, vcpu_cpusets
from vmjobs.virt.migration import MigrationFailed, retarget_xml
from vmjobs.virt.pinning import pinning_of

URI = "test:///default"
OFFLINE, UNPLUG = hotplug.ShrinkWay.OFFLINE, hotplug.ShrinkWay.UNPLUG


def _alloc(cpus: tuple[int, ...], memory: int = 256, node: int = 0,
           host: str = "a") -> Allocation:
    return Allocation(host=host, cpus=cpus, memory_mib=memory,
                      nodes=(NodeShare(node=node, cpus=tuple(sorted(cpus)),
                                       memory_mib=memory),))


def _resizable(name: str, cpus: tuple[int, ...] = (0,)) -> str:
    spec = replace(SPECS["1node-emulated-nic"](), name=name, job_id=name[6:],
                   allocation=_alloc(cpus), nics=(),
                   hotplug=Hotplug(max_cpus=4, max_extra_mib=512))
    return build(spec)


@pytest.fixture
def dom() -> Iterator[libvirt.virDomain]:
    conn = libvirt.open(URI)
    running = conn.createXML(for_test_driver(_resizable("vmjob-unplug")), 0)
    yield running
    running.destroy()
    conn.close()


def test_a_vcpu_left_plugged_is_confined_to_the_cores_the_job_keeps() -> None:
    assert vcpu_cpusets((3,)) == ((3,),)
    assert vcpu_cpusets((3,), 2) == ((3,), (3,))
    assert vcpu_cpusets((5, 3), 4) == ((5,), (3,), (3, 5), (3, 5))
    assert vcpu_cpusets((5, 3), 1) == ((5,), (3,))  # never fewer than the allocation's


def test_the_way_a_guest_gives_vcpus_back_follows_its_domain_type() -> None:
    assert hotplug.ShrinkWay.for_virt_type("qemu") == OFFLINE
    assert hotplug.ShrinkWay.for_virt_type("kvm") == UNPLUG
    root = ET.fromstring(_resizable("vmjob-t"))
    assert hotplug.limits(ET.tostring(root, encoding="unicode")).virt_type == root.get("type")
    root.set("type", "qemu")
    assert hotplug.limits(ET.tostring(root, encoding="unicode")).virt_type == "qemu"


def test_set_vcpus_plugs_confines_reuses_and_unplugs(dom: libvirt.virDomain) -> None:
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    assert hotplug.set_vcpus(dom, (0, 1), OFFLINE) == hotplug.VcpuChange.PLUGGED
    assert dom.vcpusFlags(live) == 2
    assert pinning_of(dom)[:2] == ({0}, {1})
    # TCG's way: the vCPU stays plugged (libvirt still counts it) but may only run on cpu 0
    assert hotplug.set_vcpus(dom, (0,), OFFLINE) == hotplug.VcpuChange.CONFINED
    assert dom.vcpusFlags(live) == 2
    assert pinning_of(dom)[:2] == ({0}, {0})
    # the next grow uses it again, on whichever core the job grows into
    assert hotplug.set_vcpus(dom, (0, 2), OFFLINE) == hotplug.VcpuChange.REONLINED
    assert dom.vcpusFlags(live) == 2 and pinning_of(dom)[:2] == ({0}, {2})
    assert hotplug.set_vcpus(dom, (0, 2, 3), OFFLINE) == hotplug.VcpuChange.PLUGGED
    assert dom.vcpusFlags(live) == 3 and pinning_of(dom)[:3] == ({0}, {2}, {3})
    # KVM's way: unplugged
    assert hotplug.set_vcpus(dom, (0,), UNPLUG) == hotplug.VcpuChange.UNPLUGGED
    assert dom.vcpusFlags(live) == 1
    assert hotplug.set_vcpus(dom, (0,), OFFLINE) == hotplug.VcpuChange.UNCHANGED


def test_a_migration_or_restore_after_a_confined_shrink_keeps_the_vcpu_confined(
        dom: libvirt.virDomain, tmp_path: Path) -> None:
    hotplug.set_vcpus(dom, (0, 1), OFFLINE)
    hotplug.set_vcpus(dom, (0,), OFFLINE)  # vCPU 1 offline in the guest, still plugged
    source = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    xml = retarget_xml(source, _alloc((5,), host="b"), frozenset(), tmp_path / "console.b.log")
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    assert vcpu is not None and (vcpu.text, vcpu.get("current")) == ("4", "2")
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.iterfind("cputune/vcpupin")] == [
        ("0", "5"), ("1", "5")]
    emulator = root.find("cputune/emulatorpin")
    assert emulator is not None and emulator.get("cpuset") == "5"
    cell = root.find("cpu/numa/cell")
    assert cell is not None and cell.get("cpus") == "0-3"  # the guest's topology as it was
    # the destination takes it, and the plugged vCPU can only run on the job's core there
    other = ET.fromstring(xml)  # the test driver is one host: another name and uuid
    name, uuid = other.find("name"), other.find("uuid")
    assert name is not None and uuid is not None
    name.text = "vmjob-unplug-b"
    other.remove(uuid)
    conn = libvirt.open(URI)
    try:
        moved = conn.createXML(ET.tostring(other, encoding="unicode"), 0)
        try:
            assert moved.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2
            assert pinning_of(moved)[:2] == ({5}, {5})
        finally:
            moved.destroy()
    finally:
        conn.close()
    # a grown guest (2 online) moves with each vCPU on its own new core
    grown = retarget_xml(source, _alloc((4, 6), host="b"), frozenset(), None)
    assert [p.get("cpuset") for p in ET.fromstring(grown).iterfind("cputune/vcpupin")] == [
        "4", "6"]


def test_a_resizable_guest_retargets_only_to_what_it_has_plugged_on_one_node(
        dom: libvirt.virDomain) -> None:
    source = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)  # 1 of 4 vCPUs plugged
    # as it started (a resizable guest was refused before: its <vcpu> is the maximum)
    pins = [p.get("cpuset") for p in
            ET.fromstring(retarget_xml(source, _alloc((7,)), frozenset(), None))
            .iterfind("cputune/vcpupin")]
    assert pins == ["7"]
    with pytest.raises(MigrationFailed, match="has 1 vCPUs plugged"):
        retarget_xml(source, _alloc((1, 2)), frozenset(), None)
    two_nodes = Allocation(host="b", cpus=(1,), memory_mib=256,
                           nodes=(NodeShare(0, (1,), 128), NodeShare(1, (), 128)))
    with pytest.raises(MigrationFailed, match="one cell"):
        retarget_xml(source, two_nodes, frozenset(), None)
