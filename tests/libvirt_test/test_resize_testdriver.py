"""`vmjob resize` without a hypervisor: the resizable domain XML (libvirt's test driver takes
it), the engine's choice of cpus (`placement.resize`), what a live guest's XML allows
(`virt.hotplug.limits`), and the control flow of `vmjobs.resize.resize_job` on the test
driver: refusals change nothing; a hotplug libvirt refuses puts the old reservation back."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import libvirt
import pytest

import placement
from placement import Allocation, NodeShare, Request
from tests.libvirt_test.domain_specs import SPECS
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from tests.libvirt_test.test_recovery_moves import add, daemon, guests
from vmjobs.daemon.core import Daemon
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.jobs import JobState
from vmjobs.resize import ResizeFailed, resize_job
from vmjobs.virt import hotplug
from vmjobs.virt.domain_xml import HOTPLUG_CMDLINE, Hotplug, build

__all__ = ["daemon", "guests"]  # fixtures
URI = "test:///default"


def _resizable(job_id: str, cpu: int = 0) -> str:
    alloc = Allocation(host="a", cpus=(cpu,), memory_mib=256,
                       nodes=(NodeShare(node=0, cpus=(cpu,), memory_mib=256),))
    spec = replace(SPECS["1node-emulated-nic"](), name=f"vmjob-{job_id}", job_id=job_id,
                   allocation=alloc, nics=(), hotplug=Hotplug(max_cpus=4, max_extra_mib=512))
    return build(spec)


def test_the_resizable_domain_xml() -> None:
    root = ET.fromstring(_resizable("x"))
    vcpu = root.find("vcpu")
    assert vcpu is not None and (vcpu.text, vcpu.get("current")) == ("4", "1")
    max_memory = root.find("maxMemory")
    assert max_memory is not None and (max_memory.text, max_memory.get("unit"),
                                       max_memory.get("slots")) == ("768", "MiB", "1")
    # libvirt's <memory> counts the device; the cell holds what the guest boots with
    assert root.findtext("memory") == "768"
    # every possible vCPU is in the one guest cell; only the online one is pinned
    cell = root.find("cpu/numa/cell")
    assert cell is not None and cell.get("cpus") == "0-3" and cell.get("memory") == "256"
    assert [p.get("vcpu") for p in root.iterfind("cputune/vcpupin")] == ["0"]
    topology = root.find("cpu/topology")
    assert topology is not None and topology.get("cores") == "4"
    mem = root.find("devices/memory[@model='virtio-mem']/target")
    assert mem is not None
    assert [(e.tag, e.text, e.get("unit")) for e in mem] == [
        ("size", "512", "MiB"), ("node", "0", None), ("block", "2048", "KiB"),
        ("requested", "0", "MiB")]
    cmdline = root.find("os/cmdline")
    assert cmdline is not None and cmdline.text and cmdline.text.endswith(HOTPLUG_CMDLINE)
    # a fixed-size guest is as before: no maximum, no device, no option
    fixed = ET.fromstring(build(SPECS["1node-emulated-nic"]()))
    assert fixed.find("maxMemory") is None and fixed.find("devices/memory") is None
    assert HOTPLUG_CMDLINE not in (fixed.findtext("os/cmdline") or "")
    # libvirt takes it (the test driver parses and validates domain XML as the QEMU one)
    conn = libvirt.open(URI)
    try:
        dom = conn.defineXML(for_test_driver(_resizable("x")))
        try:
            limits = hotplug.limits(dom.XMLDesc(0))
            assert (limits.vcpus, limits.max_vcpus, limits.base_mib, limits.extra_max_mib) \
                == (1, 4, 256, 512)
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_a_fixed_size_guest_is_not_resizable() -> None:
    with pytest.raises(hotplug.HotplugError, match="not started resizable"):
        hotplug.limits(build(SPECS["1node-emulated-nic"]()))


def _cluster(*held: tuple[str, Allocation]) -> placement.Cluster:
    host = placement.make_host("a", nodes=2, cores=4, threads=1, memory_mib=4096)
    cluster = placement.Cluster([host])
    for job_id, alloc in held:
        cluster.reserve(job_id, alloc, Request(cpus=len(alloc.cpus), memory_mib=256))
    return cluster


def one(cpus: tuple[int, ...], memory: int = 256, node: int = 0) -> Allocation:
    return Allocation(host="a", cpus=cpus, memory_mib=memory,
                      nodes=(NodeShare(node=node, cpus=tuple(sorted(cpus)), memory_mib=memory),))


def test_the_engine_grows_on_the_jobs_node_and_shrinks_from_the_last_vcpu() -> None:
    cluster = _cluster(("j", one((2,))), ("other", one((0, 1))))
    grown = placement.resize(cluster, "j", 2, 1024)
    assert grown.allocation == one((2, 3), 1024)  # vCPU 0 stays on cpu 2; node 0's free one
    shrunk = placement.resize(_cluster(("j", one((3, 1, 2)))), "j", 1, 256)
    assert shrunk.allocation == one((3,))
    full = placement.resize(cluster, "j", 8, 256)
    assert not full.fits and "node 0 of a has 1 free cpus; 7 more asked" in full.reason
    assert "MiB free" in placement.resize(cluster, "j", 1, 9000).reason
    spanning = Allocation(host="a", cpus=(0, 4), memory_mib=512,
                          nodes=(NodeShare(0, (0,), 256), NodeShare(1, (4,), 256)))
    assert "spans NUMA nodes 0, 1" in placement.resize(_cluster(("s", spanning)), "s", 3,
                                                         512).reason


def _running(served: Daemon, running: list[str], job_id: str, cpu: int) -> None:
    add(served, job_id, JobState.RUNNING, one((cpu,)))
    conn = libvirt.open(URI)
    try:
        conn.createXML(for_test_driver(_resizable(job_id, cpu)), 0)
    finally:
        conn.close()
    running.append(job_id)


def _resize(served: Daemon, job_id: str, cpus: int | None, memory: int | None) -> object:
    return resize_job(served.config, served.store, served.hosts.conns(),
                      served.hosts.inventory(), job_id, cpus, memory)


def test_refusals_change_nothing_and_a_refused_hotplug_puts_the_reservation_back(
        daemon: Daemon, guests: list[str]) -> None:  # noqa: F811
    _running(daemon, guests, "r", 0)
    before = daemon.store.job("r").allocation  # type: ignore[union-attr]
    for cpus, memory, message in ((9, None, "1 to 4 vCPUs, not 9"),
                                  (None, 1000, "256 MiB to 768 MiB"),
                                  (None, 301, "in steps of 2 MiB"),
                                  (1, 256, "already has 1 cpus and 256 MiB")):
        with pytest.raises(VmjobsError, match=message):
            _resize(daemon, "r", cpus, memory)
        assert daemon.store.job("r").allocation == before  # type: ignore[union-attr]
    # the test driver has no virtio-mem update: the hotplug fails after the reservation
    # was made, and the old one is back
    with pytest.raises(ResizeFailed, match="resize failed: .*its old size and reservation "
                                           "are back"):
        _resize(daemon, "r", 2, 512)
    assert daemon.store.job("r").allocation == before  # type: ignore[union-attr]
    assert daemon.store.reserved_cpus("a") == {0: "r"}
    reasons = [e.reason for e in daemon.store.events("r")]
    assert any("resize: reserved" in (r or "") for r in reasons)
    # a node without room: DoesNotFit before anything is reserved
    add(daemon, "hog", JobState.RUNNING, one((1,), memory=1700))  # node 0 keeps 92 MiB
    with pytest.raises(DoesNotFit, match="cannot grow"):
        _resize(daemon, "r", 1, 512)
    assert daemon.store.job("r").allocation == before  # type: ignore[union-attr]
