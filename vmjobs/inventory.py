"""What a host has, read from libvirt and turned into placement values.

The parsers take XML text so they can be tested against captured capabilities and
node-device documents; `read_host` is the one function that talks to libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt

from placement import Cpu, Device, Host, HostState, Node
from vmjobs.config import HostConfig

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

    @property
    def is_network(self) -> bool:
        return self.pci_class is not None and self.pci_class >> 16 == NETWORK_CLASS_PREFIX


def parse_capabilities(xml: str) -> tuple[Node, ...]:
    """NUMA cells of a host's capabilities XML -> placement nodes (memory as reported)."""
    root = ET.fromstring(xml)
    cells = root.findall("./host/topology/cells/cell")
    nodes = []
    for cell in cells:
        cpus = tuple(
            Cpu(
                id=int(cpu.get("id", "0")),
                core=int(cpu.get("core_id", cpu.get("id", "0"))),
                socket=int(cpu.get("socket_id", "0")),
                siblings=_siblings(cpu.get("siblings"), int(cpu.get("id", "0"))),
            )
            for cpu in cell.findall("./cpus/cpu")
        )
        memory = cell.find("memory")
        memory_mib = _to_mib(memory) if memory is not None else 0
        pages = [(int(p.get("size", "0")), int(p.text or 0)) for p in cell.findall("pages")]
        # libvirt lists the base page size too (4 KiB on x86, 64 KiB on many arm64 kernels):
        # the smallest size a cell lists is that, and only the larger ones are hugepages.
        base = min((size for size, _ in pages), default=0)
        hugepages = tuple(sorted((size, count) for size, count in pages
                                 if size > base and count > 0))
        nodes.append(Node(id=int(cell.get("id", "0")), cpus=cpus, memory_mib=memory_mib,
                          hugepages=hugepages))
    return tuple(sorted(nodes, key=lambda n: n.id))


def _siblings(text: str | None, cpu_id: int) -> frozenset[int]:
    from vmjobs.units import parse_cpu_list

    return parse_cpu_list(text) | {cpu_id} if text else frozenset({cpu_id})


def _to_mib(element: ET.Element) -> int:
    unit = (element.get("unit") or "KiB").lower()
    scale = {"kib": 1 / 1024, "k": 1 / 1024, "mib": 1, "m": 1, "gib": 1024, "g": 1024,
             "b": 1 / (1 << 20), "bytes": 1 / (1 << 20)}.get(unit, 1 / 1024)
    return int(int(element.text or 0) * scale)


def parse_pci_device(xml: str) -> PciDevice | None:
    """One node-device XML document -> PciDevice, or None when it is not a PCI device."""
    root = ET.fromstring(xml)
    cap = root.find("./capability[@type='pci']")
    if cap is None:
        return None
    address = "{:04x}:{:02x}:{:02x}.{:x}".format(
        *(int(cap.findtext(part, "0"), 0) for part in ("domain", "bus", "slot", "function"))
    )
    class_text = cap.findtext("class")
    numa = cap.find("numa")
    group = cap.find("iommuGroup")
    vendor = cap.find("vendor")
    product = cap.find("product")
    return PciDevice(
        address=address,
        pci_class=int(class_text, 0) if class_text else None,
        vendor=(vendor.get("id", "") if vendor is not None else "").lower(),
        product=(product.get("id", "") if product is not None else "").lower(),
        # libvirt omits <numa> (or says -1) on single-node machines: node 0 then
        node=max(0, int(numa.get("node", "0"))) if numa is not None else 0,
        iommu_group=int(group.get("number", "0")) if group is not None else None,
        driver=root.findtext("./driver/name"),
    )


def allowed(device: PciDevice, allow: Iterable[str]) -> bool:
    """The config's allow-list names devices by PCI address or by vendor:product."""
    vendor_product = f"{device.vendor.removeprefix('0x')}:{device.product.removeprefix('0x')}"
    for entry in allow:
        entry = entry.lower()
        if entry == device.address:
            return True
        if ":" in entry and entry.replace("0x", "") == vendor_product and "." not in entry:
            return True
    return False


def nic_devices(pci: Iterable[PciDevice], allow: Iterable[str]) -> tuple[Device, ...]:
    """Network-class PCI devices on the allow-list. Nothing else is ever handed to a job."""
    allow = tuple(allow)
    return tuple(
        Device(address=d.address, node=d.node, kind="nic", vendor=d.vendor, product=d.product,
               iommu_group=d.iommu_group)
        for d in sorted(pci, key=lambda d: d.address)
        if d.is_network and allowed(d, allow)
    )


def emulated_devices(config: HostConfig) -> tuple[Device, ...]:
    return tuple(
        Device(address=f"{EMULATED_PREFIX}{nic.name}", node=nic.node, kind="nic")
        for nic in config.emulated_nics
    )


def build_host(config: HostConfig, nodes: tuple[Node, ...], devices: tuple[Device, ...],
               state: HostState = HostState.UP) -> Host:
    """Apply the config's reservations to the hardware libvirt reported."""
    if config.reserved_memory_mib and nodes:
        # The OS reservation is split evenly over the nodes: the kernel's own memory is spread.
        share = -(-config.reserved_memory_mib // len(nodes))
        nodes = tuple(
            Node(id=n.id, cpus=n.cpus, memory_mib=max(0, n.memory_mib - share),
                 hugepages=n.hugepages)
            for n in nodes
        )
    node_ids = {n.id for n in nodes}
    devices = tuple(d for d in devices if d.node in node_ids)
    return Host(
        name=config.name,
        nodes=nodes,
        devices=devices,
        reserved_cpus=config.reserved_cpus,
        labels=config.labels,
        pool=config.pool,
        state=state,
    )


def read_nodes(conn: libvirt.virConnect) -> tuple[Node, ...]:
    """The host's NUMA nodes as libvirt reports them, before any reservation."""
    return parse_capabilities(conn.getCapabilities()) or _nodes_without_topology(conn)


def read_host(conn: libvirt.virConnect, config: HostConfig, nic_backend: str) -> Host:
    nodes = read_nodes(conn)
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
    return build_host(config, nodes, devices)


def _nodes_without_topology(conn: libvirt.virConnect) -> tuple[Node, ...]:
    # Some drivers (and containers) report no <topology>: treat the host as one node.
    model, memory_mib, cpus, *_ = conn.getInfo()
    del model
    return (
        Node(id=0, cpus=tuple(Cpu(id=i, core=i, socket=0, siblings=frozenset({i}))
                              for i in range(cpus)), memory_mib=memory_mib),
    )


def cpu_node_map(host: Host) -> dict[int, int]:
    return {cpu.id: node.id for node in host.nodes for cpu in node.cpus}


def devices_by_node(host: Host) -> dict[int, list[Device]]:
    grouped: dict[int, list[Device]] = defaultdict(list)
    for device in host.devices:
        grouped[device.node].append(device)
    return dict(grouped)
