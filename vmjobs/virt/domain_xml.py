"""Domain XML for one job, built with ElementTree from typed values (never by string formatting).

One small builder per element, in the order libvirt documents them. `read_metadata` is the
inverse for the part that matters after a crash: which job a domain is and what it holds.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from placement import Allocation, NodeShare
from vmjobs.units import format_cpu_list

METADATA_NS = "urn:x-vmjobs:job:1"
ET.register_namespace("vmjob", METADATA_NS)
# NICs sit at fixed guest slots so $NIC0.. are known before boot and stay valid across moves.
FIRST_NIC_SLOT = 0x10
MAX_NICS = 16
OUTPUT_DISK_SLOT = 0x05
# cryptomgr.notests: no crypto self-tests at boot (~0.2 s of a TCG boot; the guest runs one
# job and its kernel is Debian's tested build). no_timer_check: skip the IO-APIC timer check,
# which under host load wrongly panicked ~1 in 200 boots ("IO-APIC + timer doesn't work!").
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 cryptomgr.notests no_timer_check"
# The virtio-serial port on which the guest init takes the wall-clock time after a migration
# or a restore (see vmjobs/guestclock.py and images/init).
CLOCK_CHANNEL = "org.vmjobs.clock.0"
# The virtio-serial port the guest init sends the job's stdout and stderr to (images/init).
OUTPUT_CHANNEL = "org.vmjobs.output.0"
# The virtio-serial port on which a guest restored from a template receives its job
# (vmjobs/template.py, images/init): a `pipe` chardev whose input is a regular file.
JOB_CHANNEL = "org.vmjobs.job.0"
# The virtio-serial port an interactive job's stdin (or terminal) comes in on, as frames
# (vmjobs/console.py, images/vmjob-console.c); opened by the host through libvirt
# (vmjobs/virt/console.py).
INPUT_CHANNEL = "org.vmjobs.input.0"
# The virtio-serial port vmjob-ctl talks to the daemon's control service on (a gang member's
# coordination: vmjobs/control.py, images/vmjob-ctl.c); reached like the clock port.
CONTROL_CHANNEL = "org.vmjobs.ctl.0"
# A gang member's NIC on its gang's private network sits here, below the job's own NICs.
GANG_NIC_SLOT = 0x0E


@dataclass(frozen=True)
class PciAddress:
    domain: int = 0
    bus: int = 0
    slot: int = 0
    function: int = 0

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        domain, bus, rest = text.split(":")
        slot, function = rest.split(".")
        return cls(int(domain, 16), int(bus, 16), int(slot, 16), int(function, 16))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    def element(self, tag: str = "address", with_type: bool = True) -> ET.Element:
        attrs = {"type": "pci"} if with_type else {}
        attrs.update(
            domain=f"0x{self.domain:04x}", bus=f"0x{self.bus:02x}",
            slot=f"0x{self.slot:02x}", function=f"0x{self.function:x}",
        )
        return ET.Element(tag, attrs)


def guest_nic_address(index: int) -> PciAddress:
    if not 0 <= index < MAX_NICS:
        raise ValueError(f"at most {MAX_NICS} NICs per job")
    return PciAddress(slot=FIRST_NIC_SLOT + index)


@dataclass(frozen=True)
class Nic:
    guest_address: PciAddress
    host_device: str  # host PCI address (vfio) or "emulated:<name>"

    @property
    def emulated(self) -> bool:
        return self.host_device.startswith("emulated:")


@dataclass(frozen=True)
class BridgeNic:
    """A virtio NIC on a host bridge (a gang member's private network, vmjobs/gangnet.py)."""

    mac: str
    bridge: str
    mtu: int


@dataclass(frozen=True)
class DomainSpec:
    name: str
    job_id: str
    owner: str
    owner_uid: int
    virt_type: str  # "kvm" | "qemu"
    allocation: Allocation
    kernel: Path
    initrd: Path
    console_log: Path
    output_disk: Path
    emulator_cpus: frozenset[int] = frozenset()  # empty: the job's own cpus
    nics: tuple[Nic, ...] = ()
    cmdline: str = CMDLINE
    loader: Path | None = None  # a firmware ROM (qboot) instead of QEMU's default SeaBIOS
    clock_channel: bool = False  # the guest can be told the time after a move
    output_pipe: Path | None = None  # the job's output: QEMU writes <output_pipe>.out
    job_pipe: Path | None = None  # warm start: the job comes from <job_pipe>.in
    gang_nic: BridgeNic | None = None  # a gang member's NIC on its gang network
    control_channel: bool = False  # a gang member's vmjob-ctl port
    input_channel: bool = False  # an interactive job: its stdin comes on INPUT_CHANNEL
    hotplug: Hotplug | None = None  # room to grow the guest live (`vmjob resize`)
    # a virtio balloon that reports the guest's memory use every this many seconds (the
    # daemon's sampler reads it); never inflated. None: no balloon device at all
    balloon_period_s: int | None = None


@dataclass(frozen=True)
class Hotplug:
    """How far a guest can grow live: `max_cpus` vCPUs (those beyond the allocation's start
    offline, unpinned) and `max_extra_mib` MiB of hot-pluggable memory in one virtio-mem
    device on guest cell 0 (none plugged at start). Only for one-cell guests."""

    max_cpus: int
    max_extra_mib: int


# virtio-mem hands memory to the guest in blocks of this size (x86 Linux's memory block size is
# 128 MiB; virtio-mem's smallest block is 2 MiB, one huge page, and it plugs sub-blocks).
VIRTIO_MEM_BLOCK_KIB = 2048
# The guest kernel onlines hot-plugged memory at once, movable so that it can be unplugged
# again (without this option Debian's kernel leaves it offline: no udev in our guest).
HOTPLUG_CMDLINE = "memhp_default_state=online_movable"


def build(spec: DomainSpec) -> str:
    alloc = spec.allocation
    domain = ET.Element("domain", type=spec.virt_type)
    _text(domain, "name", spec.name)
    domain.append(metadata(spec))
    hotplug = spec.hotplug
    if hotplug is not None:
        if len(alloc.nodes) != 1 or alloc.hugepage_kib:
            raise ValueError("hotplug needs a guest of one NUMA cell without hugepages")
        # the ceiling for base + hot-plugged memory; virtio-mem takes no DIMM slot
        _text(domain, "maxMemory", str(alloc.memory_mib + hotplug.max_extra_mib), unit="MiB",
              slots="1")
    # libvirt's <memory> is the total, memory devices included (the guest's cells hold the
    # rest, what it boots with)
    extra = hotplug.max_extra_mib if hotplug is not None else 0
    _text(domain, "memory", str(alloc.memory_mib + extra), unit="MiB")
    if alloc.hugepage_kib:
        domain.append(memory_backing(alloc))
    vcpu = _text(domain, "vcpu", str(len(alloc.cpus)), placement="static")
    if hotplug is not None:
        vcpu.text = str(hotplug.max_cpus)
        vcpu.set("current", str(len(alloc.cpus)))
    domain.append(cputune(alloc, spec.emulator_cpus))
    domain.append(numatune(alloc))
    domain.append(os_boot(spec))
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # without it `poweroff -f` halts and the domain never stops
    domain.append(cpu(alloc, spec.virt_type, hotplug.max_cpus if hotplug else None))
    ET.SubElement(domain, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "destroy"),
                          ("on_crash", "destroy")):
        _text(domain, event, action)
    domain.append(devices(spec))
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def metadata(spec: DomainSpec) -> ET.Element:
    wrapper = ET.Element("metadata")
    job = ET.SubElement(wrapper, f"{{{METADATA_NS}}}job", id=spec.job_id, owner=spec.owner,
                        uid=str(spec.owner_uid))
    job.append(allocation_element(spec.allocation))
    return wrapper


def allocation_element(alloc: Allocation) -> ET.Element:
    element = ET.Element(
        f"{{{METADATA_NS}}}allocation", host=alloc.host, cpus=",".join(map(str, alloc.cpus)),
        memory_mib=str(alloc.memory_mib),
    )
    if alloc.devices:
        element.set("devices", ",".join(alloc.devices))
    if alloc.hugepage_kib:
        element.set("hugepage_kib", str(alloc.hugepage_kib))
    if alloc.idle_cpus:
        element.set("idle_cpus", ",".join(map(str, alloc.idle_cpus)))
    for share in alloc.nodes:
        ET.SubElement(element, f"{{{METADATA_NS}}}node", id=str(share.node),
                      cpus=",".join(map(str, share.cpus)), memory_mib=str(share.memory_mib))
    return element


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


@dataclass(frozen=True)
class DomainMetadata:
    job_id: str
    owner: str
    owner_uid: int
    allocation: Allocation


def read_metadata(domain_xml: str) -> DomainMetadata | None:
    """The job a domain runs, or None for domains that are not ours."""
    job = ET.fromstring(domain_xml).find(f"./metadata/{{{METADATA_NS}}}job")
    if job is None:
        return None
    alloc = job.find(f"{{{METADATA_NS}}}allocation")
    if alloc is None:
        return None
    return DomainMetadata(
        job_id=job.get("id", ""),
        owner=job.get("owner", ""),
        owner_uid=int(job.get("uid", "-1")),
        allocation=Allocation(
            host=alloc.get("host", ""),
            cpus=_ints(alloc.get("cpus")),
            memory_mib=int(alloc.get("memory_mib", "0")),
            nodes=tuple(
                NodeShare(node=int(n.get("id", "0")), cpus=_ints(n.get("cpus")),
                          memory_mib=int(n.get("memory_mib", "0")))
                for n in alloc.findall(f"{{{METADATA_NS}}}node")
            ),
            devices=tuple(d for d in (alloc.get("devices") or "").split(",") if d),
            hugepage_kib=int(alloc.get("hugepage_kib")) if alloc.get("hugepage_kib") else None,
            idle_cpus=_ints(alloc.get("idle_cpus")),
        ),
    )


def memory_backing(alloc: Allocation) -> ET.Element:
    backing = ET.Element("memoryBacking")
    pages = ET.SubElement(backing, "hugepages")
    # <page nodeset> names guest NUMA cells (0..n-1), not host nodes: numatune maps the cells.
    ET.SubElement(pages, "page", size=str(alloc.hugepage_kib), unit="KiB",
                  nodeset=format_cpu_list(list(range(len(alloc.nodes)))))
    return backing


def vcpu_cpusets(cpus: tuple[int, ...], plugged: int = 0) -> tuple[tuple[int, ...], ...]:
    """The host cpus each of a guest's `max(plugged, len(cpus))` vCPUs may run on (`cpus`: an
    allocation's, vCPU i on cpus[i]): vCPU i < len(cpus) on cpus[i] alone; a vCPU beyond them
    that is still plugged
    (a resizable guest's shrink that its guest offlined but QEMU did not unplug: TCG, see
    vmjobs/virt/hotplug.py) is *confined* to all of the job's cpus, so its halted thread can
    never run on a core the job gave back."""
    confined = tuple(sorted(cpus))
    return tuple((cpu,) for cpu in cpus) + (confined,) * max(plugged - len(cpus), 0)


def cputune(alloc: Allocation, emulator_cpus: frozenset[int], plugged: int = 0) -> ET.Element:
    """`<cputune>`: a `<vcpupin>` per vCPU of `vcpu_cpusets(alloc, plugged)`, `<emulatorpin>`."""
    tune = ET.Element("cputune")
    for vcpu, cpus in enumerate(vcpu_cpusets(alloc.cpus, plugged)):
        ET.SubElement(tune, "vcpupin", vcpu=str(vcpu), cpuset=format_cpu_list(cpus))
    # Emulator threads go to the host's reserved cores when it has them, otherwise they share
    # the job's own cores: either way they never run on another job's cores.
    ET.SubElement(tune, "emulatorpin", cpuset=format_cpu_list(emulator_cpus or set(alloc.cpus)))
    return tune


def numatune(alloc: Allocation) -> ET.Element:
    tune = ET.Element("numatune")
    ET.SubElement(tune, "memory", mode="strict",
                  nodeset=format_cpu_list([s.node for s in alloc.nodes]))
    for cell, share in enumerate(alloc.nodes):
        ET.SubElement(tune, "memnode", cellid=str(cell), mode="strict", nodeset=str(share.node))
    return tune


def guest_cells(alloc: Allocation) -> list[tuple[list[int], int]]:
    """Guest NUMA cells mirroring the host nodes the allocation uses: (vCPU indices, MiB)."""
    cells = []
    for share in alloc.nodes:
        members = set(share.cpus)
        cells.append(([i for i, c in enumerate(alloc.cpus) if c in members], share.memory_mib))
    return cells


def cpu(alloc: Allocation, virt_type: str, max_cpus: int | None = None) -> ET.Element:
    """`<cpu>`: one socket of as many cores as the guest has vCPUs (or may have, `max_cpus`:
    every possible vCPU belongs to a core and to a guest NUMA cell, the one cell of a
    hot-pluggable guest)."""
    # TCG cannot pass the host CPU through; KVM should see the real one.
    element = ET.Element("cpu", mode="host-passthrough") if virt_type == "kvm" else ET.Element(
        "cpu")
    ET.SubElement(element, "topology", sockets="1", dies="1",
                  cores=str(max_cpus or len(alloc.cpus)), threads="1")
    numa = ET.SubElement(element, "numa")
    cells = guest_cells(alloc)
    if max_cpus is not None:
        cells = [(list(range(max_cpus)), alloc.memory_mib)]
    for cell, (vcpus, memory_mib) in enumerate(cells):
        guest_cell = ET.SubElement(numa, "cell", id=str(cell))
        if vcpus:  # a cell mirroring a memory-only host node has none (libvirt: no attribute)
            guest_cell.set("cpus", format_cpu_list(vcpus))
        guest_cell.set("memory", str(memory_mib))
        guest_cell.set("unit", "MiB")
    return element


def os_boot(spec: DomainSpec) -> ET.Element:
    os_element = ET.Element("os")
    _text(os_element, "type", "hvm", arch="x86_64")
    if spec.loader is not None:
        # type='rom' is QEMU's -bios: the ROM replaces SeaBIOS (no NVRAM, no UEFI)
        _text(os_element, "loader", str(spec.loader), type="rom", readonly="yes")
    _text(os_element, "kernel", str(spec.kernel))
    _text(os_element, "initrd", str(spec.initrd))
    _text(os_element, "cmdline", spec.cmdline if spec.hotplug is None
          else f"{spec.cmdline} {HOTPLUG_CMDLINE}")
    return os_element


def devices(spec: DomainSpec) -> ET.Element:
    devs = ET.Element("devices")
    devs.append(output_disk(spec.output_disk))
    for nic in spec.nics:
        devs.append(nic_element(nic))
    if spec.gang_nic is not None:
        devs.append(bridge_nic(spec.gang_nic))
    serial = ET.SubElement(devs, "serial", type="file")
    ET.SubElement(serial, "source", path=str(spec.console_log), append="on")
    ET.SubElement(serial, "target", port="0")
    if spec.clock_channel:
        devs.append(clock_channel())
    if spec.input_channel:
        devs.append(unix_channel(INPUT_CHANNEL))
    if spec.control_channel:
        devs.append(unix_channel(CONTROL_CHANNEL))
    if spec.output_pipe is not None:
        devs.append(output_channel(spec.output_pipe))
    if spec.job_pipe is not None:
        devs.append(pipe_channel(spec.job_pipe, JOB_CHANNEL))
    if spec.hotplug is not None and spec.hotplug.max_extra_mib > 0:
        devs.append(virtio_mem(spec.hotplug.max_extra_mib, 0))
    # Nothing the job did not ask for: no USB, no graphics, no default network; a balloon
    # only to report memory use (docs/borrowing.md).
    ET.SubElement(devs, "controller", type="usb", model="none")
    devs.append(memballoon(spec.balloon_period_s))
    return devs


def memballoon(period_s: int | None) -> ET.Element:
    """`<memballoon model='virtio'><stats period='N'/></memballoon>`: the guest's balloon
    driver sends its memory statistics (MemAvailable as `usable`, MemFree as `unused`, ...)
    every `period_s` seconds, which libvirt's `memoryStats()` returns. vmjobs never inflates
    it, so it takes no memory from the guest. None: `<memballoon model='none'/>` (libvirt
    would otherwise add a balloon of its own). Raises ValueError for a period below 1 s
    (libvirt reads 0 as "no statistics")."""
    if period_s is None:
        return ET.Element("memballoon", model="none")
    if period_s < 1:
        raise ValueError(f"a balloon statistics period is whole seconds >= 1, not {period_s}")
    element = ET.Element("memballoon", model="virtio")
    ET.SubElement(element, "stats", period=str(period_s))
    return element


def output_channel(pipe: Path) -> ET.Element:
    """The job's output port. A `pipe` chardev makes QEMU open `<pipe>.in` and `<pipe>.out`
    itself: `.out` is a regular file it writes to, `.in` a FIFO nobody writes to. A `file`
    chardev would go through libvirt's log daemon, which rotates it at 2 MiB and drops the
    oldest data (virtlogd.conf max_size/max_backups, a host-wide setting); this way nothing
    stands between the guest and the spool, whatever the host's settings. The kernel's and
    the init's messages stay on the serial console (small, rotation does not matter)."""
    return pipe_channel(pipe, OUTPUT_CHANNEL)


def pipe_channel(pipe: Path, name: str) -> ET.Element:
    """A virtio-serial port `name` whose host side is QEMU's `pipe` chardev: it reads
    `<pipe>.in` and writes `<pipe>.out` itself."""
    channel = ET.Element("channel", type="pipe")
    ET.SubElement(channel, "source", path=str(pipe))
    ET.SubElement(channel, "target", type="virtio", name=name)
    return channel


def virtio_mem(size_mib: int, requested_mib: int, cell: int = 0) -> ET.Element:
    """A virtio-mem device on guest cell `cell`: `size_mib` of guest-physical room, of which
    `requested_mib` plugged (the guest's driver plugs and unplugs blocks to follow it)."""
    memory = ET.Element("memory", model="virtio-mem")
    target = ET.SubElement(memory, "target")
    _text(target, "size", str(size_mib), unit="MiB")
    _text(target, "node", str(cell))
    _text(target, "block", str(VIRTIO_MEM_BLOCK_KIB), unit="KiB")
    _text(target, "requested", str(requested_mib), unit="MiB")
    return memory


def clock_channel() -> ET.Element:
    return unix_channel(CLOCK_CHANNEL)


def unix_channel(name: str) -> ET.Element:
    """A virtio-serial port `name` whose host side is a unix socket libvirt places on each
    host; `virDomainOpenChannel` reaches it through libvirt, remote hosts included, and again
    after a migration on the destination (clock, input, control)."""
    channel = ET.Element("channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=name)
    return channel


def bridge_nic(nic: BridgeNic) -> ET.Element:
    """`<interface type='bridge'>`: libvirt makes a tap on `nic.bridge` for the guest."""
    interface = ET.Element("interface", type="bridge")
    ET.SubElement(interface, "mac", address=nic.mac)
    ET.SubElement(interface, "source", bridge=nic.bridge)
    ET.SubElement(interface, "model", type="virtio")
    ET.SubElement(interface, "mtu", size=str(nic.mtu))
    interface.append(PciAddress(slot=GANG_NIC_SLOT).element())
    return interface


def output_disk(path: Path) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    # A write the host cannot make (a full spool) is an I/O error for the guest, whose init
    # then reports it; QEMU's default (werror=enospc) would pause the guest, holding its
    # cores with nobody to notice.
    ET.SubElement(disk, "driver", name="qemu", type="raw", error_policy="report")
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    disk.append(PciAddress(slot=OUTPUT_DISK_SLOT).element())
    return disk


def nic_element(nic: Nic) -> ET.Element:
    return emulated_nic(nic) if nic.emulated else hostdev_nic(nic)


def hostdev_nic(nic: Nic) -> ET.Element:
    hostdev = ET.Element("hostdev", mode="subsystem", type="pci", managed="yes")
    ET.SubElement(hostdev, "driver", name="vfio")
    source = ET.SubElement(hostdev, "source")
    source.append(PciAddress.parse(nic.host_device).element(with_type=False))
    hostdev.append(nic.guest_address.element())
    return hostdev


def emulated_nic(nic: Nic) -> ET.Element:
    # A tap that is attached to nothing: the device exists at the fixed address, but it gives
    # the guest no network the job did not ask for.
    interface = ET.Element("interface", type="ethernet")
    ET.SubElement(interface, "model", type="virtio")
    interface.append(nic.guest_address.element())
    return interface
