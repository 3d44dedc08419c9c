"""read_host against libvirt's test driver: capabilities and node devices through the real API."""

from __future__ import annotations

import libvirt

from placement import Device
from vmjobs.config import EmulatedNic, HostConfig
from vmjobs.inventory import read_host


def test_default_driver_two_cells(default_conn: libvirt.virConnect) -> None:
    config = HostConfig(name="t", uri="test:///default", reserved_cpus=frozenset({0}),
                        reserved_memory_mib=512, nic_allow=("8086:1572",))
    host = read_host(default_conn, config, "vfio")
    assert host.name == "t"
    assert [n.id for n in host.nodes] == [0, 1]
    assert [[c.id for c in n.cpus] for n in host.nodes] == [list(range(8)), list(range(8, 16))]
    assert [c.socket for c in host.nodes[1].cpus] == [1] * 8
    # 2 GiB and 4 GiB cells, less 256 MiB each for the OS
    assert [n.memory_mib for n in host.nodes] == [2048 - 256, 4096 - 256]
    # the test driver lists 2M/1G sizes with no pages, and 8 KiB base pages on cell 1:
    # none of them are hugepages a job could use
    assert [n.hugepages for n in host.nodes] == [(), ()]
    assert host.reserved_cpus == frozenset({0})
    assert host.devices == ()  # the default test host has no PCI devices


def test_default_driver_emulated_nics(default_conn: libvirt.virConnect) -> None:
    config = HostConfig(name="t", uri="test:///default",
                        emulated_nics=(EmulatedNic("enic0", 0), EmulatedNic("enic1", 1)))
    host = read_host(default_conn, config, "emulated")
    assert host.devices == (Device(address="emulated:enic0", node=0, kind="nic"),
                            Device(address="emulated:enic1", node=1, kind="nic"))


def test_custom_node_pci_allow_list(node_conn: libvirt.virConnect) -> None:
    # The NVMe disk is listed but is no NIC; the management I350 is not listed.
    config = HostConfig(name="n", uri="test:///", nic_allow=(
        "8086:1572", "0000:5e:00.0", "1af4:1041"))
    host = read_host(node_conn, config, "vfio")
    assert [(d.address, d.node, d.vendor, d.product, d.iommu_group) for d in host.devices] == [
        ("0000:00:03.0", 0, "0x1af4", "0x1041", None),
        ("0000:3b:00.0", 0, "0x8086", "0x1572", 40),
    ]


def test_custom_node_without_topology_is_one_node(node_conn: libvirt.virConnect) -> None:
    # The test driver gives a custom node no NUMA cells: vmjobs falls back to getInfo().
    host = read_host(node_conn, HostConfig(name="n", uri="test:///"), "vfio")
    (node,) = host.nodes
    assert node.id == 0
    assert [c.id for c in node.cpus] == list(range(32))
    assert node.memory_mib == 128 * 1024
    assert all(c.siblings == frozenset({c.id}) for c in node.cpus)
    assert host.devices == ()  # nothing allowed, nothing offered
