"""The guest's balloon (docs/borrowing.md "Borrowing memory") on libvirt's test driver: the
domain XML libvirt takes (a virtio balloon with a stats period, or none at all), and the
sampler reading a running domain's memory statistics into its window next to its vCPU
times."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import libvirt
import pytest

from tests.libvirt_test.domain_specs import SPECS
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.daemon.sampler import Sampler, read_memory_kib, read_vcpu_ns
from vmjobs.virt.domain_xml import build, memballoon


def test_the_balloon_element() -> None:
    assert ET.tostring(memballoon(None)) == b'<memballoon model="none" />'
    assert ET.tostring(memballoon(3)) == \
        b'<memballoon model="virtio"><stats period="3" /></memballoon>'
    with pytest.raises(ValueError):
        memballoon(0)


def test_libvirt_keeps_the_balloon_and_its_period(default_conn: libvirt.virConnect) -> None:
    spec = replace(SPECS["1node-emulated-nic"](), name="vmjob-balloon1", job_id="balloon1",
                   balloon_period_s=2)
    dom = default_conn.defineXML(for_test_driver(build(spec)))
    try:
        back = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        balloons = back.findall("devices/memballoon")
        assert [(b.get("model"), b.find("stats").get("period"))  # type: ignore[union-attr]
                for b in balloons] == [("virtio", "2")]
    finally:
        dom.undefine()
    # without a period: no balloon at all (libvirt would otherwise add its own)
    plain = replace(spec, balloon_period_s=None)
    dom = default_conn.defineXML(for_test_driver(build(plain)))
    try:
        back = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert [b.get("model") for b in back.findall("devices/memballoon")] == ["none"]
    finally:
        dom.undefine()


def test_the_sampler_reads_a_guests_memory_beside_its_vcpus(
        default_conn: libvirt.virConnect) -> None:
    spec = replace(SPECS["1node-emulated-nic"](), name="vmjob-balloon2", job_id="balloon2",
                   balloon_period_s=1)
    dom = default_conn.createXML(for_test_driver(build(spec)), 0)
    try:
        stats = read_memory_kib(default_conn, "balloon2")
        assert stats is not None and {"actual", "usable", "rss"} <= set(stats)
        sampler = Sampler(1.0, 5.0, lambda _h, job: read_vcpu_ns(default_conn, job),
                          read_memory=lambda _h, job: read_memory_kib(default_conn, job))
        sampler.sample_once([("balloon2", "t")])
        reading = sampler.memory.latest("balloon2")
        assert reading is not None
        # the test driver's figures, read through (it reports half the domain's memory as
        # MemAvailable and as QEMU's resident memory)
        assert (reading.held_kib, reading.usable_kib, reading.resident_kib) == \
            (stats["actual"], stats["usable"], stats["rss"])
        assert reading.used_kib == stats["actual"] - stats["usable"]
        assert reading.spare_kib == min(stats["usable"], stats["actual"] - stats["rss"])
        # a guest that is gone: no reading, and its window is dropped with the others
        assert read_memory_kib(default_conn, "nobody") is None
        sampler.sample_once([])
        assert sampler.memory.latest("balloon2") is None
    finally:
        dom.destroy()
