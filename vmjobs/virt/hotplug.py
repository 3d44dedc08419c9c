"""Growing and shrinking a running guest: vCPU hot(un)plug and virtio-mem memory.

A guest built with `domain_xml.Hotplug` has `<vcpu current=N>MAX</vcpu>` (vCPUs N..MAX-1
offline, unpinned) and one virtio-mem device of `max_extra_mib` on guest cell 0. Here:

- `set_vcpus`: more vCPUs: `setVcpusFlags(n, AFFECT_LIVE)` (vCPUs a shrink left plugged are
  used again first); fewer: either unplugged (`setVcpusFlags`, an ACPI eject the guest answers;
  libvirt gives up waiting after 5 s, "vcpu unplug request timed out", while the guest may
  still finish, so the live vCPU count is watched until `timeout_s`) or, where QEMU cannot
  unplug (`ShrinkWay`), left plugged for the guest to offline. Every plugged vCPU is pinned by
  `domain_xml.vcpu_cpusets`: the online ones one to a cpu, the offline ones confined to the
  job's cpus.
- `set_extra_memory`: the virtio-mem device's `<requested>` size (`updateDeviceFlags`); the
  guest's driver plugs or unplugs blocks to follow, reported back as `<current>`, watched
  until it matches or `timeout_s` passes. Unplug takes what the guest can free.
- `guest_view`: ask the guest init (its `org.vmjobs.clock.0` port) to have exactly its cpus
  0..n-1 online (it onlines those, offlines the others) and say what it sees: (online cpus,
  MemTotal KiB).

Why a shrink under TCG leaves the vCPU plugged (measured here, QEMU 7.2.22, libvirt 9.0.0,
guest Debian 6.1 cloud kernel with CONFIG_ACPI_HOTPLUG_CPU): the ACPI eject itself works (the
guest's _OST says done, QEMU's `query-cpus-fast` no longer lists the vCPU and its thread exits)
but QEMU never emits DEVICE_DELETED for the vCPU device, only for its child `.../vcpu1/lapic`:
the event is sent when the device object is finalized, and x86 TCG's per-vCPU SMM address
space (`cpu-smm`, over a memory region the vCPU owns) keeps a reference to it. libvirt waits
for that event, so its vCPU count never drops, a second request fails, the domain XML keeps
the vCPU (a migration or restore would bring it back) and a later grow cannot plug it again.
Offlining in the guest and confining the halted thread frees the core without that.

Every function raises VirtError / VmjobsError with libvirt's or the guest's words.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import StrEnum

import libvirt

from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection, Domain, VirtError
from vmjobs.virt.domain_xml import vcpu_cpusets
from vmjobs.virt.guestclock import ClockError, ask
from vmjobs.virt.pinning import cpumap, pinning_of

POLL_S = 0.2


class HotplugError(VmjobsError):
    pass


class ShrinkWay(StrEnum):
    """How a guest gives vCPUs back."""

    UNPLUG = "unplug"  # ACPI eject; QEMU removes the vCPU (KVM)
    OFFLINE = "offline"  # the guest offlines it; it stays plugged, confined (TCG: see above)

    @classmethod
    def for_virt_type(cls, virt_type: str) -> ShrinkWay:
        return cls.OFFLINE if virt_type == "qemu" else cls.UNPLUG


class VcpuChange(StrEnum):
    """What `set_vcpus` did, in words for events and --json."""

    UNCHANGED = "unchanged"
    PLUGGED = "plugged"  # new vCPUs hot-plugged (and any offline ones online again)
    REONLINED = "onlined again"  # only vCPUs a shrink had left plugged, pinned to new cores
    UNPLUGGED = "unplugged"
    CONFINED = "offlined by the guest and confined to the job's cores"


@dataclass(frozen=True)
class Limits:
    """What a running guest's XML allows: its vCPUs now (plugged: online and confined) and at
    most; its virtio-mem device's size and plugged (requested / current) memory, MiB; base
    memory MiB (without it); the domain's type ("kvm" | "qemu")."""

    vcpus: int
    max_vcpus: int
    base_mib: int
    extra_max_mib: int
    extra_requested_mib: int
    extra_current_mib: int
    virt_type: str = "kvm"


def _mib(element: ET.Element | None) -> int:
    if element is None or element.text is None:
        return 0
    factor = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "b": 1 / (1 << 20),
              "bytes": 1 / (1 << 20)}.get(element.get("unit", "KiB"), 1 / 1024)
    return int(int(element.text) * factor)


def limits(domain_xml: str) -> Limits:
    """Parse a running guest's live XML; HotplugError if it was not built to grow."""
    root = ET.fromstring(domain_xml)
    vcpu = root.find("vcpu")
    mem = root.find("./devices/memory[@model='virtio-mem']/target")
    if vcpu is None or vcpu.text is None or root.find("maxMemory") is None:
        raise HotplugError("its guest was not started resizable (the config's "
                           "'hotplug: true' was off then)")
    maximum = int(vcpu.text)
    current = int(vcpu.get("current", maximum))
    # libvirt's <memory> counts memory devices at their full size (256 MiB + a 512 MiB
    # virtio-mem device: 768), whatever is plugged
    base = _mib(root.find("memory")) - (_mib(mem.find("size")) if mem is not None else 0)
    return Limits(current, maximum, base,
                  _mib(mem.find("size")) if mem is not None else 0,
                  _mib(mem.find("requested")) if mem is not None else 0,
                  _mib(mem.find("current")) if mem is not None else 0,
                  root.get("type", "kvm"))


def live_vcpus(dom: Domain) -> int:
    return int(dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))


def set_vcpus(dom: Domain, pins: tuple[int, ...], way: ShrinkWay,
              timeout_s: float = 30.0) -> VcpuChange:
    """Make the guest's vCPUs `len(pins)`, vCPU i pinned to host cpu `pins[i]`: plug more if
    fewer are plugged, unplug the surplus (`way` UNPLUG) or leave it plugged and confined to
    `pins` (`way` OFFLINE: the guest offlines it when `guest_view` asks). Raises VirtError
    (libvirt refused: nothing changed) or HotplugError (the guest did not follow in time)."""
    count = len(pins)
    plugged = live_vcpus(dom)
    change = VcpuChange.UNCHANGED
    if count > plugged or (count < plugged and way == ShrinkWay.UNPLUG):
        try:
            dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except VirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_TIMEOUT:
                raise
        deadline = time.monotonic() + timeout_s
        while live_vcpus(dom) != count:
            if time.monotonic() > deadline:
                raise HotplugError(f"the guest has {live_vcpus(dom)} vCPUs {timeout_s:g}s "
                                   f"after asking for {count} (it did not release them)")
            time.sleep(POLL_S)
        change = VcpuChange.PLUGGED if count > plugged else VcpuChange.UNPLUGGED
        plugged = count
    elif count < plugged:
        change = VcpuChange.CONFINED
    elif pinning_of(dom)[count - 1] != frozenset(pins[count - 1:]):
        change = VcpuChange.REONLINED  # vCPUs left plugged by a shrink, online again
    host_cpus = dom.connect().getCPUMap(0)[0]
    for vcpu, cpus in enumerate(vcpu_cpusets(pins, plugged)):
        # AFFECT_CURRENT is the live guest for a running domain (ours are transient), and
        # libvirt's test driver takes it (it refuses an explicit AFFECT_LIVE)
        dom.pinVcpuFlags(vcpu, cpumap(cpus, host_cpus), libvirt.VIR_DOMAIN_AFFECT_CURRENT)
    return change


def set_extra_memory(dom: Domain, extra_mib: int, timeout_s: float = 30.0) -> None:
    """Ask the guest's virtio-mem device for `extra_mib` plugged, and wait until the guest has
    plugged (or unplugged) that much."""
    device = ET.fromstring(dom.XMLDesc(0)).find("./devices/memory[@model='virtio-mem']")
    if device is None:
        raise HotplugError("its guest has no hot-pluggable memory")
    target = device.find("target")
    requested = target.find("requested") if target is not None else None
    if requested is None:
        raise HotplugError("its guest's virtio-mem device has no requested size")
    requested.text, requested.attrib = str(extra_mib << 10), {"unit": "KiB"}
    current = device.find("target/current")
    if current is not None:  # libvirt's output, not an input of an update
        target.remove(current)  # type: ignore[union-attr]
    dom.updateDeviceFlags(ET.tostring(device, encoding="unicode"),
                          libvirt.VIR_DOMAIN_AFFECT_LIVE)
    deadline = time.monotonic() + timeout_s
    while (now := limits(dom.XMLDesc(0)).extra_current_mib) != extra_mib:
        if time.monotonic() > deadline:
            raise HotplugError(f"the guest has {now} MiB of hot-plugged memory {timeout_s:g}s "
                               f"after asking for {extra_mib} MiB")
        time.sleep(POLL_S)


def guest_view(conn: Connection, name: str, vcpus: int,
               timeout_s: float = 20.0) -> tuple[int, int]:
    """Have the guest's cpus 0..vcpus-1 online and the others offline; answer (online cpus,
    MemTotal KiB)."""
    try:
        answer = ask(conn, name, f"online {vcpus}", timeout_s)
    except ClockError as exc:
        raise HotplugError(f"the guest did not confirm: {exc}") from None
    words = answer.split()
    if len(words) != 3 or words[0] != "ok" or not words[1].isdigit() \
            or not words[2].isdigit():
        raise HotplugError(f"the guest answered {answer[:40]!r}")
    return int(words[1]), int(words[2])
