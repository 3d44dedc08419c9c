"""NIC replug for migration (vmjobs.virt.replug): the device XML it detaches is exactly what the
domain was built with, and `plugged` reads the NICs a live domain has. The detach/attach calls
themselves run against real guests (tests/multihost, emulated NICs); libvirt's test driver does
not implement device hot-plug."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.libvirt_test.domain_specs import SPECS
from vmjobs.virt import domain_xml, replug


def _canonical(element: ET.Element) -> str:
    for e in element.iter():
        e.text = (e.text or "").strip() or None
        e.tail = None
    return ET.tostring(element, encoding="unicode")


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n]().nics))
def test_device_xml_is_the_nic_as_the_domain_has_it(name: str) -> None:
    spec = SPECS[name]()
    root = ET.fromstring(domain_xml.build(spec))
    in_domain = [*root.findall("./devices/hostdev"), *root.findall("./devices/interface")]
    assert len(in_domain) == len(spec.nics)
    for nic, element in zip(spec.nics, in_domain, strict=True):
        assert _canonical(ET.fromstring(replug.device_xml(nic))) == _canonical(element)
    assert replug.plugged(domain_xml.build(spec)) == {n.guest_address for n in spec.nics}


def test_plugged_ignores_devices_without_a_pci_address() -> None:
    xml = """<domain><devices>
      <interface type='ethernet'><model type='virtio'/></interface>
      <hostdev mode='subsystem' type='pci'><address type='pci' domain='0x0000' bus='0x00'
        slot='0x11' function='0x0'/></hostdev>
      <disk><address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></disk>
    </devices></domain>"""
    assert replug.plugged(xml) == {domain_xml.PciAddress(slot=0x11)}
