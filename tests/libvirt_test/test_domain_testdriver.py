"""The generated domain XML, defined in libvirt's test driver and read back through the API.

The test driver runs no guest and only offers `<domain type='test'>` on an i686 `hvm` machine,
so the type and arch are swapped before defining; every other element is libvirt's to parse,
keep or refuse.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.libvirt_test.domain_specs import SPECS
from vmjobs.virt.domain_xml import METADATA_NS, DomainMetadata, DomainSpec, build, read_metadata


def for_test_driver(xml: str) -> str:
    root = ET.fromstring(xml)
    root.set("type", "test")
    os_type = root.find("os/type")
    assert os_type is not None
    os_type.set("arch", "i686")
    return ET.tostring(root, encoding="unicode")


def define(conn: libvirt.virConnect, spec: DomainSpec) -> libvirt.virDomain:
    return conn.defineXML(for_test_driver(build(spec)))


def pins(root: ET.Element) -> list[tuple[str | None, str | None]]:
    return [(p.get("vcpu"), p.get("cpuset")) for p in root.findall("cputune/vcpupin")]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_defined_domain_keeps_what_we_asked(default_conn: libvirt.virConnect,
                                            name: str) -> None:
    spec = SPECS[name]()
    sent = ET.fromstring(build(spec))
    dom = define(default_conn, spec)
    try:
        assert dom.name() == spec.name
        back = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

        assert pins(back) == pins(sent) == [
            (str(i), str(c)) for i, c in enumerate(spec.allocation.cpus)]
        assert back.find("cputune/emulatorpin").get("cpuset") == (  # type: ignore[union-attr]
            sent.find("cputune/emulatorpin").get("cpuset"))  # type: ignore[union-attr]
        assert [m.attrib for m in back.findall("numatune/*")] == [
            m.attrib for m in sent.findall("numatune/*")]
        # libvirt stores memory in KiB; the guest cells still add up to it
        memory_kib = int(back.findtext("memory") or "")
        assert memory_kib == spec.allocation.memory_mib * 1024
        cells = back.findall("cpu/numa/cell")
        assert [(c.get("id"), c.get("cpus")) for c in cells] == [
            (c.get("id"), c.get("cpus")) for c in sent.findall("cpu/numa/cell")]
        assert sum(int(c.get("memory", "")) for c in cells) == memory_kib

        assert back.find("features/acpi") is not None
        assert back.findtext("on_poweroff") == "destroy"
        # the boot: qboot as a ROM (QEMU's -bios), the uncompressed kernel, the trimmed cmdline
        loader = back.find("os/loader")
        assert loader is not None and loader.get("type") == "rom"
        assert loader.text == str(spec.loader)
        assert back.findtext("os/kernel") == str(spec.kernel)
        assert back.findtext("os/cmdline") == spec.cmdline
        sources = [(h.get("managed"), h.find("source/address").attrib,  # type: ignore
                    h.find("address").attrib)  # type: ignore[union-attr]
                   for h in back.findall("devices/hostdev")]
        assert sources == [(h.get("managed"), h.find("source/address").attrib,  # type: ignore
                            h.find("address").attrib)  # type: ignore[union-attr]
                           for h in sent.findall("devices/hostdev")]
        assert len(back.findall("devices/interface")) == sum(n.emulated for n in spec.nics)
        pages = [p.attrib for p in back.findall("memoryBacking/hugepages/page")]
        assert pages == [p.attrib for p in sent.findall("memoryBacking/hugepages/page")]

        # the metadata survives libvirt's rewrite (it renames the namespace prefix)
        assert read_metadata(dom.XMLDesc(0)) == DomainMetadata(
            spec.job_id, spec.owner, spec.owner_uid, spec.allocation)
        job = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        assert (job.get("id"), job.get("owner")) == (spec.job_id, spec.owner)
    finally:
        dom.undefine()


def test_pinning_survives_a_start(default_conn: libvirt.virConnect) -> None:
    spec = SPECS["2nodes-vfio-hugepages"]()
    dom = define(default_conn, spec)
    try:
        dom.create()
        assert dom.isActive()
        live = ET.fromstring(dom.XMLDesc(0))
        assert pins(live) == [("0", "6"), ("1", "7"), ("2", "8"), ("3", "9")]
        assert live.find("cputune/emulatorpin").get("cpuset") == "0,16"  # type: ignore
        dom.destroy()
    finally:
        dom.undefine()
    assert spec.name not in [d.name() for d in default_conn.listAllDomains()]


def test_hugepages_on_one_host_node_other_than_0(default_conn: libvirt.virConnect) -> None:
    # The guest has one cell (0) on host node 1: libvirt refuses a <page nodeset> that names a
    # cell the guest does not have, so this only defines when the nodeset is the guest's.
    spec = SPECS["1node-hugepages-isolated"]()
    dom = define(default_conn, spec)
    dom.undefine()


def test_our_domains_are_told_apart_by_their_metadata(default_conn: libvirt.virConnect) -> None:
    # What a reconciliation after a crash does: list the host's domains, keep ours.
    domains = [define(default_conn, make()) for make in SPECS.values()]
    try:
        found = {}
        for dom in default_conn.listAllDomains():
            meta = read_metadata(dom.XMLDesc(0))
            if meta is not None:
                found[dom.name()] = meta.job_id
        # test:///default comes with a domain of its own ("test"): it is not ours
        assert "test" in [d.name() for d in default_conn.listAllDomains()]
        assert found == {make().name: make().job_id for make in SPECS.values()}
    finally:
        for dom in domains:
            dom.undefine()
