"""read_host against libvirt's test driver: capabilities and node devices through the real API."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from placement import Allocation, Cluster, Device, NodeShare, Request, ThreadPolicy
from tests.libvirt_test.conftest import DATA
from tests.libvirt_test.domain_specs import _spec
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.config import EmulatedNic, HostConfig
from vmjobs.virt.domain_xml import build
from vmjobs.virt.inventory import cell_memory_kib, read_host, read_topology


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


def test_default_driver_topology_checks(default_conn: libvirt.virConnect) -> None:
    topology = read_topology(default_conn)
    # every cpu carries topology; the driver's fixed 8-entry online map (0, 2, 4 online) does
    # not describe its 16 cpus, so it is ignored rather than leaving 3 cpus
    assert [len(n.cpus) for n in topology.nodes] == [8, 8]
    assert topology.siblings_known
    assert topology.notes == (
        "the online cpu map covers 8 cpus but cpu 15 is listed: map ignored",)
    # distances: the default test host lists none
    assert [n.distances for n in topology.nodes] == [(), ()]


def test_cell_memory_falls_back_to_cells_free_memory(default_conn: libvirt.virConnect) -> None:
    # The test driver has no getMemoryStats; getCellsFreeMemory answers 4194304 for its 4 GiB
    # cell 1 (the API's unit is bytes: the driver puts its KiB figure there), read as bytes.
    assert cell_memory_kib(default_conn, 1) == 4194304 // 1024


def test_memory_only_node_becomes_a_guest_cell_without_cpus(
        default_conn: libvirt.virConnect) -> None:
    # The allocation a --mem-nodes job gets on the CXL host of tests/data (see
    # tests/placement/test_cluster.py): 2 vCPUs and 4096 MiB on node 0, 15904 MiB on node 2.
    alloc = Allocation(host="c", cpus=(0, 1), memory_mib=20000, nodes=(
        NodeShare(0, (0, 1), 4096), NodeShare(2, (), 15904)))
    dom = default_conn.defineXML(for_test_driver(build(_spec("cx1", "qemu", alloc))))
    try:
        back = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefine()
    assert [(c.get("id"), c.get("cpus"), c.get("memory")) for c in back.findall(
        "cpu/numa/cell")] == [("0", "0-1", str(4096 * 1024)), ("1", None, str(15904 * 1024))]
    assert [m.attrib for m in back.findall("numatune/memnode")] == [
        {"cellid": "0", "mode": "strict", "nodeset": "0"},
        {"cellid": "1", "mode": "strict", "nodeset": "2"}]


@pytest.fixture
def groups_conn() -> Iterator[libvirt.virConnect]:
    """The test driver loaded with tests/data/testnode-groups.xml."""
    conn = libvirt.open(f"test://{DATA / 'testnode-groups.xml'}")
    yield conn
    conn.close()


def test_nics_bound_by_iommu_groups_through_the_api(groups_conn: libvirt.virConnect) -> None:
    config = HostConfig(name="g", uri="test:///", nic_allow=("14e4:16d8", "0000:19:00.1"))
    host = read_host(groups_conn, config, "vfio")
    # The test driver drops <driver> from node-device XML, so 19:00.0 looks unbound (as a real
    # libvirt reports an unbound device) and 19:00.1 is offered; a mate on a host driver is
    # tested on parsed dumps in tests/unit/test_inventory.py.
    assert [(d.address, d.iommu_group) for d in host.devices] == [
        ("0000:02:00.0", 12), ("0000:02:00.1", 12), ("0000:19:00.1", 31)]
    # No SMT data from a custom test node: isolate is refused, dedicated fits.
    assert not host.siblings_known
    cluster = Cluster([host])
    alloc = cluster.place(Request(1, 256, nics=1)).allocation
    assert alloc is not None and alloc.devices == ("0000:02:00.0",)
    cluster.reserve("x", alloc)
    assert cluster.free("g").nics_free == 1  # 02:00.1 shares group 12 with x's NIC
    assert cluster.explain(Request(1, 256, threads=ThreadPolicy.ISOLATE)).never_fits
