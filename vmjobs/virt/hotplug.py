"""Growing and shrinking a running guest: vCPU hot(un)plug and virtio-mem memory.

A guest built with `domain_xml.Hotplug` has `<vcpu current=N>MAX</vcpu>` (vCPUs N..MAX-1
offline, unpinned) and one virtio-mem device of `max_extra_mib` on guest cell 0. Here:

- `set_vcpus`: `setVcpusFlags(n, AFFECT_LIVE)`, each new vCPU pinned (`pinVcpuFlags`) to its
  host cpu. Unplug is a request the guest answers (ACPI eject; Linux offlines the cpu itself):
  libvirt gives up waiting after 5 s ("vcpu unplug request timed out") while the guest may
  still finish, so the live vCPU count is watched until `timeout_s`.
- `set_extra_memory`: the virtio-mem device's `<requested>` size (`updateDeviceFlags`); the
  guest's driver plugs or unplugs blocks to follow, reported back as `<current>`, watched
  until it matches or `timeout_s` passes. Unplug takes what the guest can free.
- `guest_view`: ask the guest init (its `org.vmjobs.clock.0` port) to online its cpus and say
  what it sees: (online cpus, MemTotal KiB).

Every function raises VirtError / VmjobsError with libvirt's or the guest's words.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection, Domain, VirtError
from vmjobs.virt.guestclock import ClockError, ask

POLL_S = 0.2


class HotplugError(VmjobsError):
    pass


@dataclass(frozen=True)
class Limits:
    """What a running guest's XML allows: its vCPUs now and at most; its virtio-mem device's
    size and plugged (requested / current) memory, MiB; base memory MiB (without it)."""

    vcpus: int
    max_vcpus: int
    base_mib: int
    extra_max_mib: int
    extra_requested_mib: int
    extra_current_mib: int


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
                  _mib(mem.find("current")) if mem is not None else 0)


def live_vcpus(dom: Domain) -> int:
    return int(dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))


def set_vcpus(dom: Domain, pins: tuple[int, ...], timeout_s: float = 30.0) -> None:
    """Make the guest's online vCPUs `len(pins)`, vCPU i pinned to host cpu `pins[i]` (the
    existing pins are kept; only new vCPUs are pinned)."""
    count = len(pins)
    before = live_vcpus(dom)
    if count == before:
        return
    try:
        dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except VirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_TIMEOUT:
            raise
    deadline = time.monotonic() + timeout_s
    while live_vcpus(dom) != count:
        if time.monotonic() > deadline:
            raise HotplugError(f"the guest has {live_vcpus(dom)} vCPUs {timeout_s:g}s after "
                               f"asking for {count} (it did not release them)")
        time.sleep(POLL_S)
    host_cpus = dom.connect().getInfo()[2]
    for vcpu in range(before, count):
        cpumap = tuple(i == pins[vcpu] for i in range(max(host_cpus, pins[vcpu] + 1)))
        dom.pinVcpuFlags(vcpu, cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)


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
    """Have the guest online cpus 0..vcpus-1 and answer (online cpus, MemTotal KiB)."""
    try:
        answer = ask(conn, name, f"online {vcpus}", timeout_s)
    except ClockError as exc:
        raise HotplugError(f"the guest did not confirm: {exc}") from None
    words = answer.split()
    if len(words) != 3 or words[0] != "ok" or not words[1].isdigit() \
            or not words[2].isdigit():
        raise HotplugError(f"the guest answered {answer[:40]!r}")
    return int(words[1]), int(words[2])
