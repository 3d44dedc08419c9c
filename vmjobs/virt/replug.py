"""Passthrough NICs block live migration (a VFIO device's state cannot be copied): unplug
them from the running guest, migrate, and plug equivalent NICs of the destination in at the
same guest PCI addresses, so `$NIC0..` stay valid inside the job.

Hot-unplug is a request the guest must answer (ACPI eject): libvirt's detach returns before
the device is gone, so `unplug` waits until the live domain no longer lists it, and a guest
that never lets go fails the move before anything else happened. The same functions serve
`nic_backend: emulated` NICs (same addresses, an emulated model), which is how the path runs
for real on machines without an IOMMU.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable

import libvirt

from vmjobs.errors import VmjobsError
from vmjobs.virt import Domain, domain_xml
from vmjobs.virt.domain_xml import Nic, PciAddress

UNPLUG_TIMEOUT_S = 15.0


class ReplugFailed(VmjobsError):
    pass


def device_xml(nic: Nic) -> str:
    return ET.tostring(domain_xml.nic_element(nic), encoding="unicode")


def plugged(live_xml: str) -> set[PciAddress]:
    """Guest PCI addresses of the NICs (hostdevs and interfaces) a domain has now."""
    root = ET.fromstring(live_xml)
    found = set()
    for device in [*root.findall("./devices/hostdev"), *root.findall("./devices/interface")]:
        address = device.find("address")
        if address is not None and address.get("type") == "pci":
            found.add(PciAddress(*(int(address.get(k, "0"), 16)
                                   for k in ("domain", "bus", "slot", "function"))))
    return found


def unplug(dom: Domain, nics: Iterable[Nic],
           timeout_s: float = UNPLUG_TIMEOUT_S) -> None:
    """Detach `nics` from the running guest and wait until they are gone; on failure plug back
    the ones already removed, so the guest is as it was."""
    nics = tuple(nics)
    removed: list[Nic] = []
    try:
        for nic in nics:
            dom.detachDeviceFlags(device_xml(nic), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + timeout_s
            while nic.guest_address in plugged(dom.XMLDesc(0)):
                if time.monotonic() > deadline:
                    raise ReplugFailed(f"the guest did not release the NIC at "
                                       f"{nic.guest_address} within {timeout_s:.0f}s")
                time.sleep(0.1)
            removed.append(nic)
    except (libvirt.libvirtError, ReplugFailed) as exc:
        message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        back = plug(dom, removed)
        raise ReplugFailed(f"unplugging the NICs failed: {message}"
                           + (f"; {back}" if back else "")) from None


def plug(dom: Domain, nics: Iterable[Nic]) -> str | None:
    """Attach `nics` to the running guest at their guest addresses. None when all went in,
    else what failed (the guest keeps running either way)."""
    failed = []
    for nic in nics:
        try:
            dom.attachDeviceFlags(device_xml(nic), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            failed.append(f"{nic.host_device} at {nic.guest_address}: {exc.get_error_message()}")
    return "plugging NICs failed: " + "; ".join(failed) if failed else None
