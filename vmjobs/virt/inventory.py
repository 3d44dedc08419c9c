"""What a host has, read from libvirt and turned into placement values.

The parsers take XML text so they can be tested against captured capabilities and
node-device documents (and so `vmjob inventory` can read saved dumps); `read_host` is the one
function that talks to libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import libvirt

from placement import Cpu, Device, Host, HostState, Node
from placement.ledger import empty_ledger
from vmjobs.config import HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.units import format_cpu_list, parse_cpu_list
from vmjobs.virt import Connection

NETWORK_CLASS_PREFIX = 0x02  # PCI base class "network controller"
EMULATED_PREFIX = "emulated:"


@dataclass(frozen=True)
class PciDevice:
    address: str
    pci_class: int | None
    vendor: str
    product: str
    node: int
    iommu_group: int | None
    driver: str | None
    pf: str | None = None  # SR-IOV: this VF's physical function
    vfs: tuple[str, ...] = ()  # SR-IOV: this PF's virtual functions (the enabled ones)
    group_members: tuple[str, ...] = ()  # every address of its IOMMU group, itself included

    @property
    def is_network(self) -> bool:
        return self.pci_class is not None and self.pci_class >> 16 == NETWORK_CLASS_PREFIX


@dataclass(frozen=True)
class Topology:
    """What a capabilities document says about a host's NUMA cells, after vmjobs' checks.

    `nodes`: cells with their usable cpus and ordinary memory (MemTotal - hugepage pools).
    `siblings_known`: False when no cpu carried topology attributes (no SMT data at all).
    `no_memory`: ids of cells that listed no <memory>; their memory_mib is 0 until
    `with_cell_memory` fills it from the node's own figures.
    `notes`: one line per cpu or cell left out or guessed, for people to read.
    """

    nodes: tuple[Node, ...]
    siblings_known: bool = True
    no_memory: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


def _has_topology(cpu: ET.Element) -> bool:
    return cpu.get("siblings") is not None or cpu.get("core_id") is not None


class InventoryError(VmjobsError):
    """A capabilities or node-device document vmjobs cannot read (a malformed number)."""


def parse_topology(xml: str) -> Topology:
    """A host's capabilities XML -> its NUMA cells as placement nodes, and what was left out.

    Never handed out: a cpu listed without topology attributes while others have them (how
    libvirt shows an offline cpu, which has no sysfs topology), and a cpu id listed in two
    cells. Hugepage pools are part of a cell's <memory> (the node's MemTotal), so they are taken
    out of its ordinary memory; the smallest page size a cell lists is its base page, not a
    hugepage. Distances are the cell's <distances> (ACPI SLIT values, 10 = local).
    Raises InventoryError on a malformed number.
    """
    try:
        return _parse_topology(xml)
    except (ValueError, VmjobsError) as exc:  # int() / parse_cpu_list on a malformed value
        raise InventoryError(f"capabilities: malformed number ({exc})") from None


def _parse_topology(xml: str) -> Topology:
    root = ET.fromstring(xml)
    cells = root.findall("./host/topology/cells/cell")
    listed = [(int(cell.get("id", "0")), cpu) for cell in cells
              for cpu in cell.findall("./cpus/cpu")]
    with_topology = any(_has_topology(cpu) for _, cpu in listed)
    seen: dict[int, list[int]] = defaultdict(list)
    for cell_id, cpu in listed:
        seen[int(cpu.get("id", "0"))].append(cell_id)
    notes = [f"cpu {cpu_id} is listed in cells {' and '.join(map(str, in_cells))}: not used"
             for cpu_id, in_cells in sorted(seen.items()) if len(in_cells) > 1]
    nodes = []
    no_memory = []
    for cell in cells:
        cell_id = int(cell.get("id", "0"))
        cpus = []
        offline = []
        for cpu in cell.findall("./cpus/cpu"):
            cpu_id = int(cpu.get("id", "0"))
            if len(seen[cpu_id]) > 1:
                continue
            if with_topology and not _has_topology(cpu):
                offline.append(cpu_id)
                continue
            cpus.append(Cpu(id=cpu_id, core=int(cpu.get("core_id", cpu_id)),
                            socket=int(cpu.get("socket_id", "0")),
                            siblings=_siblings(cpu.get("siblings"), cpu_id)))
        if offline:
            notes.append(f"node {cell_id}: cpus {format_cpu_list(offline)} have no topology "
                         "(offline): not used")
        pages = [(int(p.get("size", "0")), int(p.text or 0)) for p in cell.findall("pages")]
        # libvirt lists the base page size too (4 KiB on x86, 64 KiB on many arm64 and ppc64
        # kernels): the smallest size a cell lists is that; only the larger ones are hugepages.
        base = min((size for size, _ in pages), default=0)
        hugepages = tuple(sorted((size, count) for size, count in pages
                                 if size > base and count > 0))
        memory = cell.find("memory")
        if memory is None:
            no_memory.append(cell_id)
            notes.append(f"node {cell_id} lists no memory (on a live host vmjobs reads it from "
                         "libvirt's getMemoryStats; from a saved file it counts as 0)")
        memory_mib = ordinary_mib(_to_kib(memory), hugepages) if memory is not None else 0
        distances = tuple(sorted((int(s.get("id", "0")), int(s.get("value", "0")))
                                 for s in cell.findall("./distances/sibling")))
        nodes.append(Node(id=cell_id, cpus=tuple(sorted(cpus, key=lambda c: c.id)),
                          memory_mib=memory_mib, hugepages=hugepages, distances=distances))
    if listed and not with_topology:
        notes.append("libvirt reports no cpu topology: each cpu counts as its own core and "
                     "--threads isolate is refused")
    return Topology(nodes=tuple(sorted(nodes, key=lambda n: n.id)),
                    siblings_known=with_topology or not listed,
                    no_memory=tuple(sorted(no_memory)), notes=tuple(notes))


def parse_capabilities(xml: str) -> tuple[Node, ...]:
    """NUMA cells of a host's capabilities XML -> placement nodes (see `parse_topology`)."""
    return parse_topology(xml).nodes


def ordinary_mib(memtotal_kib: int, hugepages: Iterable[tuple[int, int]]) -> int:
    """A node's memory for ordinary (non-hugepage) guests: MemTotal less its hugepage pools,
    in whole MiB rounded down, never below 0. `hugepages`: (page size KiB, pages) pairs."""
    return max(0, memtotal_kib - sum(size * count for size, count in hugepages)) // 1024


def with_cell_memory(topology: Topology, memtotal_kib: Mapping[int, int]) -> Topology:
    """Fill the memory of cells that listed none from `memtotal_kib` (node id -> KiB)."""
    nodes = tuple(
        replace(n, memory_mib=ordinary_mib(memtotal_kib[n.id], n.hugepages))
        if n.id in topology.no_memory and n.id in memtotal_kib else n
        for n in topology.nodes
    )
    left = tuple(i for i in topology.no_memory if i not in memtotal_kib)
    return replace(topology, nodes=nodes, no_memory=left)


def with_online(topology: Topology, online: list[bool]) -> Topology:
    """Drop the cpus the host's online map (`getCPUMap()[1]`, index = cpu id) marks offline.

    A map shorter than the highest cpu id listed does not describe these cpus (libvirt's test
    driver reports a fixed 8-cpu map whatever its capabilities list): it is ignored, noted.
    """
    ids = [c.id for n in topology.nodes for c in n.cpus]
    if not ids:
        return topology
    if max(ids) >= len(online):
        note = (f"the online cpu map covers {len(online)} cpus but cpu {max(ids)} is listed: "
                "map ignored")
        return replace(topology, notes=(*topology.notes, note))
    notes = list(topology.notes)
    nodes = []
    for node in topology.nodes:
        offline = [c.id for c in node.cpus if not online[c.id]]
        if offline:
            notes.append(f"node {node.id}: cpus {format_cpu_list(offline)} are offline: not used")
        nodes.append(replace(node, cpus=tuple(c for c in node.cpus if online[c.id])))
    return replace(topology, nodes=tuple(nodes), notes=tuple(notes))


def _siblings(text: str | None, cpu_id: int) -> frozenset[int]:
    return parse_cpu_list(text) | {cpu_id} if text else frozenset({cpu_id})


def _to_kib(element: ET.Element) -> int:
    unit = (element.get("unit") or "KiB").lower()
    scale = {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1 << 20, "g": 1 << 20,
             "b": 1 / 1024, "bytes": 1 / 1024}.get(unit, 1)
    return int(int(element.text or 0) * scale)


def _pci_address(domain: str, bus: str, slot: str, function: str) -> str:
    return "{:04x}:{:02x}:{:02x}.{:x}".format(*(int(p, 0) for p in (domain, bus, slot, function)))


def _address_element(element: ET.Element) -> str:
    """<address domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/> -> "0000:3b:02.1"."""
    return _pci_address(*(element.get(p, "0") for p in ("domain", "bus", "slot", "function")))


def parse_pci_device(xml: str) -> PciDevice | None:
    """One node-device XML document -> PciDevice, or None when it is not a PCI device.

    SR-IOV: a PF lists its enabled VFs under <capability type='virt_functions'>, a VF names
    its PF under <capability type='phys_function'>. Raises InventoryError on a malformed number.
    """
    try:
        return _parse_pci_device(xml)
    except ValueError as exc:
        raise InventoryError(f"node device: malformed number ({exc})") from None


def _parse_pci_device(xml: str) -> PciDevice | None:
    root = ET.fromstring(xml)
    cap = root.find("./capability[@type='pci']")
    if cap is None:
        return None
    address = _pci_address(*(cap.findtext(p, "0") for p in ("domain", "bus", "slot", "function")))
    class_text = cap.findtext("class")
    numa = cap.find("numa")
    group = cap.find("iommuGroup")
    vendor = cap.find("vendor")
    product = cap.find("product")
    pf = cap.find("./capability[@type='phys_function']/address")
    return PciDevice(
        address=address,
        pci_class=int(class_text, 0) if class_text else None,
        vendor=(vendor.get("id", "") if vendor is not None else "").lower(),
        product=(product.get("id", "") if product is not None else "").lower(),
        # libvirt omits <numa> (or says -1) on single-node machines: node 0 then
        node=max(0, int(numa.get("node", "0"))) if numa is not None else 0,
        iommu_group=int(group.get("number", "0")) if group is not None else None,
        driver=root.findtext("./driver/name"),
        pf=_address_element(pf) if pf is not None else None,
        vfs=tuple(sorted(_address_element(a) for a in
                         cap.findall("./capability[@type='virt_functions']/address"))),
        group_members=tuple(sorted(_address_element(a) for a in cap.findall("iommuGroup/address"))),
    )


def parse_node_devices(xml: str) -> list[PciDevice]:
    """PCI devices of a saved node-device dump: one <device> (`virsh nodedev-dumpxml`) or
    several under any root element; non-PCI devices are skipped. Raises InventoryError when
    the document holds no <device> at all (another file given by mistake, e.g. capabilities:
    taking it as "no devices" would hide every NIC without a word)."""
    root = ET.fromstring(xml)
    documents = [root] if root.tag == "device" else root.findall("device")
    if not documents:
        raise InventoryError(f"no <device> element under <{root.tag}> (not `virsh "
                             "nodedev-dumpxml` output)")
    found = (parse_pci_device(ET.tostring(d, encoding="unicode")) for d in documents)
    return [d for d in found if d is not None]


def _names_address(device: PciDevice, allow: Iterable[str]) -> bool:
    return any(entry.lower() == device.address for entry in allow)


def _names_model(device: PciDevice, allow: Iterable[str]) -> bool:
    vendor_product = f"{device.vendor.removeprefix('0x')}:{device.product.removeprefix('0x')}"
    return any(":" in entry and "." not in entry
               and entry.lower().replace("0x", "") == vendor_product for entry in allow)


def allowed(device: PciDevice, allow: Iterable[str]) -> bool:
    """The config's allow-list names devices by PCI address or by vendor:product."""
    allow = tuple(allow)
    return _names_address(device, allow) or _names_model(device, allow)


def nic_devices(pci: Iterable[PciDevice], allow: Iterable[str]) -> tuple[Device, ...]:
    """Network-class PCI devices on the allow-list. Nothing else is ever handed to a job.

    An address naming an SR-IOV PF with VFs enabled stands for its VFs: the PF carries them
    and cannot be passed through without destroying them. (A vendor:product entry matching
    the PF still offers it; the placement engine then never gives it out while a VF is held.)
    A NIC whose IOMMU group holds a device the host uses is left out (`unassignable`).
    """
    pci = list(pci)
    listed = _offered(pci, allow)
    stuck = unassignable(pci, {d.address for d in listed})
    return network_devices(d for d in listed if d.address not in stuck)


def _offered(pci: Iterable[PciDevice], allow: Iterable[str]) -> list[PciDevice]:
    allow = tuple(allow)
    pci = sorted(pci, key=lambda d: d.address)
    named_pfs = {d.address for d in pci if d.vfs and _names_address(d, allow)}

    def offered(d: PciDevice) -> bool:
        if _names_model(d, allow) or d.pf in named_pfs:
            return True
        return _names_address(d, allow) and not d.vfs

    return [d for d in pci if d.is_network and offered(d)]


# Drivers a device may keep while another device of its IOMMU group goes to a guest: the kernel
# accepts vfio-pci and pci-stub (drivers/vfio/group.c, vfio_driver_allowed), or no driver.
_VFIO_VIABLE_DRIVERS = (None, "vfio-pci", "pci-stub")
PCI_BRIDGE_CLASS = 0x06  # base class "bridge": the kernel lets bridges keep their driver


def unassignable(pci: Iterable[PciDevice], offered: set[str]) -> dict[str, str]:
    """Offered NICs that VFIO could not assign, address -> why: a device of the same IOMMU
    group is not offered to jobs and is bound to a host driver (the host itself uses it), so
    the group is not viable. Only devices present in `pci` are judged; a group member not
    listed there is assumed harmless."""
    by_address = {d.address: d for d in pci}
    stuck: dict[str, str] = {}
    for address in sorted(offered):
        device = by_address.get(address)
        if device is None:
            continue
        for member in device.group_members:
            mate = by_address.get(member)
            if (member == address or member in offered or mate is None
                    or mate.driver in _VFIO_VIABLE_DRIVERS
                    or (mate.pci_class is not None and mate.pci_class >> 16 == PCI_BRIDGE_CLASS)):
                continue
            stuck[address] = (f"NIC {address} is not offered: IOMMU group {device.iommu_group} "
                              f"also holds {member}, which the host uses (driver {mate.driver})")
            break
    return stuck


def nic_notes(pci: Iterable[PciDevice], allow: Iterable[str]) -> list[str]:
    """Why allow-listed NICs are left out, one line each: an address the device list does not
    hold, a PF whose VFs (which it stands for) it does not hold, a group VFIO could not assign
    (see `unassignable`). The first two matter for saved dumps, where a device is easily
    forgotten: without a note the NIC would vanish silently."""
    pci = list(pci)
    allow = tuple(allow)
    known = {d.address for d in pci}
    notes = [f"NIC {entry.lower()} of the allow-list is not among the devices given"
             for entry in allow if "." in entry and entry.lower() not in known]
    for d in pci:
        missing = [vf for vf in d.vfs if vf not in known]
        if missing and _names_address(d, allow):
            notes.append(f"NIC {d.address} stands for its VFs; {', '.join(missing)} "
                         "not among the devices given")
    listed = _offered(pci, allow)
    return [*notes, *unassignable(pci, {d.address for d in listed}).values()]


def network_devices(pci: Iterable[PciDevice]) -> tuple[Device, ...]:
    """Every network-class device of `pci` as a placement NIC, in address order, no allow-list
    applied (for showing a host's hardware, never for handing devices out)."""
    return tuple(
        Device(address=d.address, node=d.node, kind="nic", vendor=d.vendor, product=d.product,
               iommu_group=d.iommu_group, pf=d.pf, vfs=d.vfs)
        for d in sorted(pci, key=lambda d: d.address) if d.is_network
    )


def emulated_devices(config: HostConfig) -> tuple[Device, ...]:
    return tuple(
        Device(address=f"{EMULATED_PREFIX}{nic.name}", node=nic.node, kind="nic")
        for nic in config.emulated_nics
    )


def build_host(config: HostConfig, nodes: tuple[Node, ...], devices: tuple[Device, ...],
               state: HostState = HostState.UP, siblings_known: bool = True) -> Host:
    """Apply the config's reservations to the hardware libvirt reported.

    The OS memory reservation is split evenly over the nodes that have cpus (the kernel's own
    memory is spread over them; a memory-only CXL/HBM node holds none of it), rounded up.
    """
    with_cpus = [n for n in nodes if n.cpus] or list(nodes)
    if config.reserved_memory_mib and with_cpus:
        share = -(-config.reserved_memory_mib // len(with_cpus))
        taken = {n.id for n in with_cpus}
        nodes = tuple(replace(n, memory_mib=max(0, n.memory_mib - share)) if n.id in taken
                      else n for n in nodes)
    node_ids = {n.id for n in nodes}
    devices = tuple(d for d in devices if d.node in node_ids)
    return Host(
        name=config.name,
        nodes=nodes,
        devices=devices,
        reserved_cpus=config.reserved_cpus,
        labels=config.labels,
        pools=config.pools,
        state=state,
        siblings_known=siblings_known,
    )


def read_topology(conn: Connection) -> Topology:
    """The host's NUMA topology through libvirt, every check of `parse_topology` applied, plus
    the online cpu map and the memory of cells whose capabilities list none."""
    topology = parse_topology(conn.getCapabilities())
    if not topology.nodes:
        return _topology_without_cells(conn)
    if topology.no_memory:
        topology = with_cell_memory(topology, {i: cell_memory_kib(conn, i)
                                               for i in topology.no_memory})
    _, online, _ = conn.getCPUMap()
    return with_online(topology, list(online))


def cell_memory_kib(conn: Connection, cell: int) -> int:
    """A NUMA node's MemTotal in KiB: `getMemoryStats(cell)`'s total where the driver has it,
    else `getCellsFreeMemory` (its free memory, in bytes: less than the total, never more)."""
    try:
        return int(conn.getMemoryStats(cell)["total"])
    except (libvirt.libvirtError, KeyError):
        return int(conn.getCellsFreeMemory(cell, 1)[0]) // 1024


def read_host(conn: Connection, config: HostConfig, nic_backend: str) -> Host:
    topology = read_topology(conn)
    if nic_backend == "emulated":
        devices = emulated_devices(config)
    else:
        pci = [
            d for d in (
                parse_pci_device(dev.XMLDesc(0))
                for dev in conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
            )
            if d is not None
        ]
        devices = nic_devices(pci, config.nic_allow)
    return build_host(config, topology.nodes, devices, siblings_known=topology.siblings_known)


def _topology_without_cells(conn: Connection) -> Topology:
    # Some drivers (and containers) report no <topology>: treat the host as one node, each cpu
    # its own core. That is a guess about SMT, so isolate is refused there.
    _, memory_mib, cpus, *_ = conn.getInfo()
    node = Node(id=0, cpus=tuple(Cpu(id=i, core=i, socket=0, siblings=frozenset({i}))
                                 for i in range(cpus)), memory_mib=memory_mib)
    return Topology(nodes=(node,), siblings_known=False,
                    notes=("libvirt reports no NUMA cells: one node from getInfo()",))


def cpu_node_map(host: Host) -> dict[int, int]:
    return {cpu.id: node.id for node in host.nodes for cpu in node.cpus}


def devices_by_node(host: Host) -> dict[int, list[Device]]:
    grouped: dict[int, list[Device]] = defaultdict(list)
    for device in host.devices:
        grouped[device.node].append(device)
    return dict(grouped)


def describe(host: Host, notes: Iterable[str] = ()) -> dict[str, Any]:
    """What the placement engine will see on `host`, as plain data (`vmjob inventory --json`).

    Per node: `cpus` (ids a job can get: online, not reserved), `cores` (cores with such cpus),
    `memory_mib` (ordinary memory, after hugepage pools and the OS reservation), `hugepages`
    ({page size KiB: pages}), `distances` ({node id: SLIT distance}), `devices` (NICs jobs can
    get on this node: `address`, `node`, `iommu_group`, `vendor`, `product`, `pf`, `vfs`).
    """
    ledger = empty_ledger(host)
    by_node = devices_by_node(host)
    nodes = []
    for node, shape in zip(sorted(host.nodes, key=lambda n: n.id), (n.shape for n in ledger.nodes),
                           strict=True):
        nodes.append({
            "id": node.id,
            "cpus": sorted(shape.cpus),
            "cores": len(shape.cores),
            "memory_mib": node.memory_mib,
            "memory_only": node.memory_only,
            "hugepages": {str(size): count for size, count in node.hugepages},
            "distances": {str(other): value for other, value in node.distances},
            "devices": [
                {"address": d.address, "node": d.node, "iommu_group": d.iommu_group,
                 "vendor": d.vendor, "product": d.product, "pf": d.pf, "vfs": list(d.vfs)}
                for d in sorted(by_node.get(node.id, []), key=lambda d: d.address)
            ],
        })
    return {"host": host.name, "siblings_known": host.siblings_known,
            "reserved_cpus": sorted(host.reserved_cpus), "nodes": nodes, "notes": list(notes)}
