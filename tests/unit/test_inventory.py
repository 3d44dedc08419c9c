"""Host inventory from libvirt XML: capabilities, PCI node devices, the NIC allow-list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from placement import (
    Allocation,
    Cluster,
    Cpu,
    Device,
    HostState,
    Node,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
)
from vmjobs.cli.hosts import usage_rows
from vmjobs.config import EmulatedNic, HostConfig
from vmjobs.virt.inventory import (
    PciDevice,
    allowed,
    build_host,
    cpu_node_map,
    devices_by_node,
    emulated_devices,
    nic_devices,
    nic_notes,
    parse_capabilities,
    parse_pci_device,
    parse_topology,
    with_cell_memory,
    with_online,
)

DATA = Path(__file__).resolve().parents[1] / "data"
X710_0 = "0000:3b:00.0"  # Intel X710, node 0
X710_1 = "0000:af:00.1"  # Intel X710, node 1
MGMT = "0000:18:00.0"  # Intel I350: the host's own management NIC
NVME = "0000:5e:00.0"  # Samsung NVMe: storage, not a NIC
VIRTIO = "0000:00:03.0"  # virtio-net without <numa> or IOMMU group


def read(name: str) -> str:
    return (DATA / name).read_text()


@pytest.fixture(scope="module")
def nodes() -> tuple[Node, ...]:
    return parse_capabilities(read("caps-2socket-smt.xml"))


@pytest.fixture(scope="module")
def pci() -> list[PciDevice]:
    devices = [parse_pci_device(p.read_text()) for p in sorted(DATA.glob("nodedev-*.xml"))]
    assert all(d is not None for d in devices)
    return devices  # type: ignore[return-value]


# --- capabilities --------------------------------------------------------------------------


def test_capabilities_cells(nodes: tuple[Node, ...]) -> None:
    assert [n.id for n in nodes] == [0, 1]
    assert [len(n.cpus) for n in nodes] == [16, 16]
    assert {c.id for c in nodes[0].cpus} == set(range(0, 8)) | set(range(16, 24))
    assert {c.id for c in nodes[1].cpus} == set(range(8, 16)) | set(range(24, 32))


def test_capabilities_cpu_topology(nodes: tuple[Node, ...]) -> None:
    cpus = {c.id: c for n in nodes for c in n.cpus}
    assert cpus[0] == Cpu(id=0, core=0, socket=0, siblings=frozenset({0, 16}))
    assert cpus[16] == Cpu(id=16, core=0, socket=0, siblings=frozenset({0, 16}))
    assert cpus[9] == Cpu(id=9, core=1, socket=1, siblings=frozenset({9, 25}))
    assert cpus[31] == Cpu(id=31, core=7, socket=1, siblings=frozenset({15, 31}))
    for node in nodes:
        assert {c.socket for c in node.cpus} == {node.id}
        # 8 physical cores per socket, each with exactly two threads that name each other
        assert len({c.siblings for c in node.cpus}) == 8
        for c in node.cpus:
            assert len(c.siblings) == 2 and c.id in c.siblings
            assert all(cpus[s].siblings == c.siblings for s in c.siblings)


def test_capabilities_memory_is_ordinary_memory_in_mib(nodes: tuple[Node, ...]) -> None:
    # A cell's <memory> is the node's MemTotal, hugepage pools included; jobs without
    # hugepages get the rest. Node 0: 65842952 KiB - 512 x 2048 KiB - 4 x 1048576 KiB
    # = 65842952 - 1048576 - 4194304 = 60600072 KiB = 59179.76 MiB -> 59179.
    # Node 1: 66058896 KiB - 256 x 2048 KiB = 66058896 - 524288 = 65534608 KiB
    # = 63998.64 MiB -> 63998.
    assert [n.memory_mib for n in nodes] == [59179, 63998]


def test_capabilities_hugepages(nodes: tuple[Node, ...]) -> None:
    # 4 KiB base pages are not hugepages; sizes with no pages are left out
    assert nodes[0].hugepages == ((2048, 512), (1048576, 4))
    assert nodes[1].hugepages == ((2048, 256),)


def test_capabilities_without_topology() -> None:
    assert parse_capabilities("<capabilities><host><cpu/></host></capabilities>") == ()


def test_capabilities_memory_units_and_cell_order() -> None:
    xml = """<capabilities><host><topology><cells num='2'>
      <cell id='1'><memory unit='GiB'>2</memory><cpus num='1'>
        <cpu id='1' socket_id='1' core_id='0' siblings='1'/></cpus></cell>
      <cell id='0'><memory unit='MiB'>1536</memory><cpus num='1'>
        <cpu id='0' socket_id='0' core_id='0' siblings='0'/></cpus></cell>
    </cells></topology></host></capabilities>"""
    nodes = parse_capabilities(xml)
    assert [(n.id, n.memory_mib) for n in nodes] == [(0, 1536), (1, 2048)]
    assert nodes[0].cpus == (Cpu(id=0, core=0, socket=0, siblings=frozenset({0})),)


def test_capabilities_64k_base_pages_are_not_hugepages() -> None:
    # arm64 with a 64 KiB page kernel: the base page is 64 KiB, hugepages 2 MiB and 512 MiB
    xml = """<capabilities><host><topology><cells num='1'><cell id='0'>
      <memory unit='KiB'>33554432</memory>
      <pages unit='KiB' size='64'>516096</pages>
      <pages unit='KiB' size='2048'>64</pages>
      <pages unit='KiB' size='524288'>0</pages>
      <cpus num='1'><cpu id='0' socket_id='0' core_id='0' siblings='0'/></cpus>
    </cell></cells></topology></host></capabilities>"""
    (node,) = parse_capabilities(xml)
    assert node.hugepages == ((2048, 64),)


# --- PCI node devices ----------------------------------------------------------------------


def test_parse_pci_nic_on_node_0() -> None:
    assert parse_pci_device(read("nodedev-x710-node0.xml")) == PciDevice(
        address=X710_0, pci_class=0x020000, vendor="0x8086", product="0x1572", node=0,
        iommu_group=40, driver="i40e", group_members=(X710_0,),
    )


def test_parse_pci_nic_on_node_1() -> None:
    device = parse_pci_device(read("nodedev-x710-node1.xml"))
    assert device is not None
    assert (device.address, device.node, device.iommu_group, device.driver) == (
        X710_1, 1, 91, "vfio-pci")
    assert device.is_network


def test_parse_pci_non_network_device() -> None:
    device = parse_pci_device(read("nodedev-nvme.xml"))
    assert device is not None
    assert (device.address, device.pci_class, device.vendor, device.product) == (
        NVME, 0x010802, "0x144d", "0xa808")
    assert not device.is_network


def test_parse_pci_device_without_numa_or_iommu_group() -> None:
    device = parse_pci_device(read("nodedev-virtio-net-no-numa.xml"))
    assert device is not None
    assert device.address == VIRTIO
    assert device.node == 0
    assert device.iommu_group is None
    assert device.is_network


def test_parse_pci_numa_minus_one_means_node_0() -> None:
    xml = read("nodedev-x710-node1.xml").replace("<numa node='1'/>", "<numa node='-1'/>")
    device = parse_pci_device(xml)
    assert device is not None and device.node == 0


def test_parse_pci_without_class() -> None:
    xml = read("nodedev-x710-node0.xml").replace("<class>0x020000</class>", "")
    device = parse_pci_device(xml)
    assert device is not None
    assert device.pci_class is None
    assert not device.is_network


def test_non_pci_device_is_none() -> None:
    xml = """<device><name>net_eno1_3c_ec_ef_00_00_01</name>
      <parent>pci_0000_18_00_0</parent>
      <capability type='net'><interface>eno1</interface>
        <address>3c:ec:ef:00:00:01</address></capability></device>"""
    assert parse_pci_device(xml) is None


@pytest.mark.parametrize(
    ("pci_class", "network"),
    [(0x020000, True), (0x028000, True), (0x010802, False), (0x030000, False),
     (0x000200, False)],
)
def test_network_class_is_the_base_class(pci_class: int, network: bool) -> None:
    device = PciDevice(X710_0, pci_class, "0x8086", "0x1572", 0, None, None)
    assert device.is_network is network


# --- the allow-list ------------------------------------------------------------------------


def by_address(pci: list[PciDevice]) -> dict[str, PciDevice]:
    return {d.address: d for d in pci}


@pytest.mark.parametrize(
    ("entry", "matches"),
    [
        (X710_0, {X710_0}),
        ("0000:3B:00.0", {X710_0}),
        ("8086:1572", {X710_0, X710_1}),
        ("0x8086:0x1572", {X710_0, X710_1}),
        ("8086:1521", {MGMT}),
        ("8086:157", set()),
        ("0000:3b:00.1", set()),
        ("1572:8086", set()),
    ],
)
def test_allowed(pci: list[PciDevice], entry: str, matches: set[str]) -> None:
    assert {d.address for d in pci if allowed(d, [entry])} == matches


def test_nothing_is_allowed_by_an_empty_list(pci: list[PciDevice]) -> None:
    assert nic_devices(pci, ()) == ()


def test_allow_list_by_vendor_product(pci: list[PciDevice]) -> None:
    devices = nic_devices(pci, ["8086:1572"])
    assert devices == (
        Device(address=X710_0, node=0, kind="nic", vendor="0x8086", product="0x1572",
               iommu_group=40),
        Device(address=X710_1, node=1, kind="nic", vendor="0x8086", product="0x1572",
               iommu_group=91),
    )


def test_allow_list_by_address(pci: list[PciDevice]) -> None:
    assert [d.address for d in nic_devices(pci, [X710_1])] == [X710_1]


def test_management_nic_not_on_the_list_is_never_returned(pci: list[PciDevice]) -> None:
    for allow in ([X710_0, X710_1], ["8086:1572"], ["8086:1572", VIRTIO], ["1af4:1041"]):
        assert MGMT not in {d.address for d in nic_devices(pci, allow)}


def test_non_network_devices_never_returned_even_if_listed(pci: list[PciDevice]) -> None:
    devices = nic_devices(pci, [NVME, "144d:a808", X710_0])
    assert [d.address for d in devices] == [X710_0]


def test_devices_sorted_by_address_whatever_the_input_order(pci: list[PciDevice]) -> None:
    allow = [X710_1, X710_0, VIRTIO, MGMT]
    forward = nic_devices(pci, allow)
    assert [d.address for d in forward] == sorted([X710_1, X710_0, VIRTIO, MGMT])
    assert nic_devices(list(reversed(pci)), allow) == forward


# --- emulated NICs and build_host -----------------------------------------------------------


def test_emulated_devices() -> None:
    config = HostConfig(name="h", uri="test:///default",
                        emulated_nics=(EmulatedNic("enic0", 0), EmulatedNic("enic1", 1)))
    assert emulated_devices(config) == (
        Device(address="emulated:enic0", node=0, kind="nic"),
        Device(address="emulated:enic1", node=1, kind="nic"),
    )
    assert emulated_devices(HostConfig(name="h", uri="x")) == ()


def test_build_host_applies_reservations(nodes: tuple[Node, ...], pci: list[PciDevice]) -> None:
    config = HostConfig(name="n1", uri="qemu+ssh://n1/system", reserved_cpus=frozenset({0, 16}),
                        reserved_memory_mib=4096, labels=(("rack", "r1"),), pools=("ci",),
                        nic_allow=("8086:1572",))
    host = build_host(config, nodes, nic_devices(pci, config.nic_allow))
    assert host.name == "n1"
    assert host.reserved_cpus == frozenset({0, 16})
    # the OS memory reservation is taken evenly from both nodes' ordinary memory
    assert [n.memory_mib for n in host.nodes] == [59179 - 2048, 63998 - 2048]
    # cpus and hugepages are what the hardware has; reserved cpus are marked, not removed
    assert [n.cpus for n in host.nodes] == [n.cpus for n in nodes]
    assert [n.hugepages for n in host.nodes] == [n.hugepages for n in nodes]
    assert [d.address for d in host.devices] == [X710_0, X710_1]
    assert (host.labels, host.pools, host.state) == ((("rack", "r1"),), ("ci",), HostState.UP)
    assert cpu_node_map(host)[16] == 0 and cpu_node_map(host)[24] == 1
    assert {node: [d.address for d in devs] for node, devs in devices_by_node(host).items()} == {
        0: [X710_0], 1: [X710_1]}


def test_build_host_rounds_the_memory_share_up_and_never_below_zero() -> None:
    small = (Node(id=0, cpus=(), memory_mib=100), Node(id=1, cpus=(), memory_mib=10_000))
    host = build_host(HostConfig(name="h", uri="x", reserved_memory_mib=301), small, ())
    assert [n.memory_mib for n in host.nodes] == [0, 10_000 - 151]


def test_build_host_without_reservations_keeps_the_hardware(nodes: tuple[Node, ...]) -> None:
    host = build_host(HostConfig(name="h", uri="x"), nodes, (), HostState.CORDONED)
    assert host.nodes == nodes
    assert host.reserved_cpus == frozenset()
    assert host.state == HostState.CORDONED


def test_build_host_drops_devices_on_nodes_it_does_not_have(nodes: tuple[Node, ...]) -> None:
    devices = (Device(address=X710_0, node=0), Device(address="emulated:e9", node=9))
    host = build_host(HostConfig(name="h", uri="x"), nodes, devices)
    assert [d.address for d in host.devices] == [X710_0]


# --- hardware as real hosts describe it -----------------------------------------------------

GROUP12 = ("0000:02:00.0", "0000:02:00.1")  # two functions of one Broadcom NIC, IOMMU group 12
CX5_PF, CX5_VF0, CX5_VF1 = "0000:d8:00.0", "0000:d8:02.0", "0000:d8:02.1"


def test_offline_cpus_without_topology_are_not_used() -> None:
    topology = parse_topology(read("caps-power8-4nodes.xml"))
    # each node lists 16 cpus, 2 cores x 8 threads; only threads 0-3 of each core are online
    assert [[c.id for c in n.cpus] for n in topology.nodes] == [
        [0, 1, 2, 3, 8, 9, 10, 11], [16, 17, 18, 19, 24, 25, 26, 27],
        [32, 33, 34, 35, 40, 41, 42, 43], [48, 49, 50, 51, 56, 57, 58, 59]]
    assert topology.nodes[2].cpus[0].siblings == frozenset({32, 33, 34, 35})
    assert topology.notes[0] == "node 0: cpus 4-7,12-15 have no topology (offline): not used"
    assert topology.siblings_known


def test_power8_hugepages_and_distances() -> None:
    nodes = parse_capabilities(read("caps-power8-4nodes.xml"))
    # 64 KiB is the base page; node 0: 8388608 KiB - 16 x 16384 KiB = 8126464 KiB = 7936 MiB
    assert [(n.id, n.memory_mib, n.hugepages) for n in nodes] == [
        (0, 7936, ((16384, 16),)), (1, 8192, ()), (16, 8192, ()), (17, 8192, ())]
    assert nodes[0].distances == ((0, 10), (1, 20), (16, 40), (17, 40))
    assert nodes[3].distances == ((0, 40), (1, 40), (16, 20), (17, 10))


def test_power8_span_takes_the_distance_20_pair() -> None:
    host = build_host(HostConfig(name="p8", uri="x"),
                      parse_capabilities(read("caps-power8-4nodes.xml")), ())
    cluster = Cluster([host])
    # Leave 6 cpus free on node 0, 2 on node 1, 6 on 16, 6 on 17.
    held = (NodeShare(0, (0, 1), 100), NodeShare(1, (16, 17, 18, 19, 24, 25), 100),
            NodeShare(16, (32, 33), 100), NodeShare(17, (48, 49), 100))
    cluster.reserve("busy", Allocation("p8", tuple(c for s in held for c in s.cpus), 400, held))
    alloc = cluster.place(Request(10, 1000, numa=NumaPolicy.ANY)).allocation
    assert alloc is not None
    # 0+16 (distance 40) has room too; 16+17 (20) is chosen. Whole free cores first: node 16
    # gets core 40-43 and the two free threads of core 32; node 17 its free core 56-59.
    assert [(s.node, s.cpus, s.memory_mib) for s in alloc.nodes] == [
        (16, (40, 41, 42, 43, 34, 35), 600), (17, (56, 57, 58, 59), 400)]


def test_cpu_in_two_cells_and_cell_without_memory() -> None:
    topology = parse_topology(read("caps-quirks.xml"))
    assert [[c.id for c in n.cpus] for n in topology.nodes] == [[0, 1, 2], [5, 6]]
    # 4194304 KiB - 100 x 2048 KiB = 3989504 KiB = 3896 MiB exactly; cell 1 lists no memory
    assert [n.memory_mib for n in topology.nodes] == [3896, 0]
    assert topology.no_memory == (1,)
    assert topology.notes == (
        "cpu 3 is listed in cells 0 and 1: not used",
        "node 0: cpus 4 have no topology (offline): not used",
        # The saved file's 0 MiB is not what a live host gets: the note says so.
        "node 1 lists no memory (on a live host vmjobs reads it from libvirt's "
        "getMemoryStats; from a saved file it counts as 0)",
    )
    filled = with_cell_memory(topology, {1: 2097152})
    assert [n.memory_mib for n in filled.nodes] == [3896, 2048]
    assert filled.no_memory == ()


def test_online_map_drops_offline_cpus_and_is_ignored_when_too_short() -> None:
    topology = parse_topology(read("caps-quirks.xml"))
    online = [True, False, True, True, True, True, False]  # cpus 1 and 6 offline
    assert [[c.id for c in n.cpus] for n in with_online(topology, online).nodes] == [[0, 2], [5]]
    assert with_online(topology, online).notes[-2:] == (
        "node 0: cpus 1 are offline: not used", "node 1: cpus 6 are offline: not used")
    short = with_online(topology, [True] * 4)
    assert short.nodes == topology.nodes
    assert short.notes[-1] == "the online cpu map covers 4 cpus but cpu 6 is listed: map ignored"


def test_no_topology_at_all_keeps_cpus_but_not_sibling_data() -> None:
    topology = parse_topology(read("caps-no-topology.xml"))
    assert [c.id for c in topology.nodes[0].cpus] == [0, 1, 2, 3]
    assert not topology.siblings_known
    host = build_host(HostConfig(name="old", uri="x"), topology.nodes, (),
                      siblings_known=topology.siblings_known)
    cluster = Cluster([host])
    assert cluster.place(Request(2, 100)).fits
    refused = cluster.explain(Request(1, 100, threads=ThreadPolicy.ISOLATE))
    assert refused.never_fits and "no SMT sibling data" in refused.summary


def test_memory_only_node_keeps_its_memory_from_the_os_reservation() -> None:
    nodes = parse_capabilities(read("caps-cxl-memory-only.xml"))
    assert [(n.id, len(n.cpus), n.memory_mib, n.memory_only) for n in nodes] == [
        (0, 4, 8192, False), (1, 4, 8192, False), (2, 0, 32768, True)]
    host = build_host(HostConfig(name="c", uri="x", reserved_memory_mib=1024), nodes, ())
    # 1024 MiB from the two nodes with cpus, 512 each; the CXL node keeps all 32768
    assert [n.memory_mib for n in host.nodes] == [7680, 7680, 32768]


def test_iommu_group_read_from_node_devices() -> None:
    fn0, fn1 = (parse_pci_device(read(f"nodedev-bcm57416-group12-fn{i}.xml")) for i in (0, 1))
    assert fn0 is not None and fn1 is not None
    assert (fn0.address, fn0.iommu_group, fn1.address, fn1.iommu_group) == (
        GROUP12[0], 12, GROUP12[1], 12)


def test_sriov_pf_and_vfs_read_from_node_devices() -> None:
    pf = parse_pci_device(read("nodedev-cx5-pf-sriov.xml"))
    vf = parse_pci_device(read("nodedev-cx5-vf0.xml"))
    assert pf is not None and vf is not None
    assert (pf.address, pf.pf, pf.vfs) == (CX5_PF, None, (CX5_VF0, CX5_VF1))
    assert (vf.address, vf.pf, vf.vfs, vf.node, vf.product) == (
        CX5_VF0, CX5_PF, (), 1, "0x1018")


def test_pf_address_on_the_allow_list_stands_for_its_vfs(pci: list[PciDevice]) -> None:
    devices = nic_devices(pci, [CX5_PF])
    assert [(d.address, d.pf) for d in devices] == [(CX5_VF0, CX5_PF), (CX5_VF1, CX5_PF)]
    # by vendor:product the PF itself is offered, carrying its VF list for the engine
    (pf,) = nic_devices(pci, ["15b3:1017"])
    assert (pf.address, pf.vfs) == (CX5_PF, (CX5_VF0, CX5_VF1))
    # a PF without VFs enabled is itself (X710: maxCount 64, none listed)
    assert [d.address for d in nic_devices(pci, [X710_0])] == [X710_0]


def test_node_devices_of_one_iommu_group_go_to_one_job(pci: list[PciDevice]) -> None:
    nodes = parse_capabilities(read("caps-2socket-smt.xml"))
    host = build_host(HostConfig(name="h", uri="x"), nodes, nic_devices(pci, ["14e4:16d8"]))
    cluster = Cluster([host])
    first = cluster.place(Request(1, 100, nics=1, numa=NumaPolicy.STRICT)).allocation
    assert first is not None and first.devices == (GROUP12[0],)
    cluster.reserve("x", first)
    again = cluster.explain(Request(1, 100, nics=1, numa=NumaPolicy.STRICT))
    assert not again.fits
    assert "NIC 0000:02:00.1 shares IOMMU group 12 with a NIC held by job x" in again.summary


# --- vmjob inventory: saved XML in, what the engine would see out ---------------------------


def vmjob(*args: str, cwd: Path = DATA) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmjobs", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, check=False,
                          env={**os.environ, "VMJOBS_CONFIG": "/nonexistent/vmjobs.yaml"})


NIC_DUMPS = ("nodedev-bcm57416-group12-fn0.xml", "nodedev-bcm57416-group12-fn1.xml",
             "nodedev-cx5-pf-sriov.xml", "nodedev-cx5-vf0.xml", "nodedev-cx5-vf1.xml",
             "nodedev-nvme.xml", "nodedev-x710-node0.xml")


def test_cli_inventory_json_with_a_config(tmp_path: Path) -> None:
    config = tmp_path / "vmjobs.yaml"
    config.write_text(
        f"spool: {tmp_path}\n"
        "hosts:\n"
        "  - {name: n7, uri: 'qemu+ssh://n7/system', reserved_cpus: '0,16', "
        "reserved_memory: 2G, nics: ['0000:d8:00.0', '14e4:16d8']}\n")
    nodedevs = [a for name in NIC_DUMPS for a in ("--nodedev", name)]
    done = vmjob("inventory", "--capabilities", "caps-2socket-smt.xml", *nodedevs,
                 "--config", str(config), "--host", "n7", "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["host"] == "n7" and view["siblings_known"]
    node0, node1 = view["nodes"]
    # cpus 0 and 16, both threads of node 0's first core, are reserved: 14 cpus on 7 cores
    assert node0["cpus"] == [*range(1, 8), *range(17, 24)] and node0["cores"] == 7
    assert node1["cpus"] == [*range(8, 16), *range(24, 32)] and node1["cores"] == 8
    # 59179 and 63998 MiB ordinary memory, less 1024 MiB each of the 2 GiB reservation
    assert [node0["memory_mib"], node1["memory_mib"]] == [58155, 62974]
    assert node0["hugepages"] == {"2048": 512, "1048576": 4}
    assert node0["distances"] == {"0": 10, "1": 21}
    # the group-12 pair by vendor:product, the ConnectX-5's VFs by its PF's address
    assert [(d["address"], d["iommu_group"]) for d in node0["devices"]] == [
        ("0000:02:00.0", 12), ("0000:02:00.1", 12)]
    assert node1["devices"] == [
        {"address": CX5_VF0, "node": 1, "iommu_group": 141, "vendor": "0x15b3",
         "product": "0x1018", "pf": CX5_PF, "vfs": []},
        {"address": CX5_VF1, "node": 1, "iommu_group": 142, "vendor": "0x15b3",
         "product": "0x1018", "pf": CX5_PF, "vfs": []},
    ]
    assert view["notes"] == []


def test_cli_inventory_text_without_config_lists_every_network_device() -> None:
    done = vmjob("inventory", "--capabilities", "caps-cxl-memory-only.xml",
                 "--nodedev", "nodedev-cx5-pf-sriov.xml", "--nodedev", "nodedev-nvme.xml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "host caps-cxl-memory-only",
        "NODE  CPUS  CORES  MEMORY  HUGEPAGES  DISTANCES",
        "0     0-3   2      8 GiB   -          0:10 1:21 2:24",
        "1     4-7   2      8 GiB   -          0:21 1:10 2:30",
        "2     -     0      32 GiB  -          0:24 1:30 2:10",
        "",
        "NIC           NODE  IOMMU GROUP  VENDOR:PRODUCT  SR-IOV",
        "0000:d8:00.0  1     140          15b3:1017       PF of 0000:d8:02.0, 0000:d8:02.1",
    ]


def test_cli_inventory_shows_what_it_left_out() -> None:
    done = vmjob("inventory", "--capabilities", "caps-no-topology.xml")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "host caps-no-topology (no SMT sibling data: --threads isolate refused)"
    assert lines[-1].startswith("note: libvirt reports no cpu topology")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "vmjob: Missing option '--capabilities'"),
        (("--capabilities", "missing.xml"), "vmjob: Invalid value for '--capabilities'"),
        (("--capabilities", "easy-backfill.swf"), "vmjob: Invalid value for --capabilities: "
                                                  "easy-backfill.swf: not XML"),
        (("--capabilities", "nodedev-nvme.xml"), "vmjob: Invalid value for --capabilities: "
                                                 "nodedev-nvme.xml: no NUMA cells"),
        # The files swapped: capabilities given as a node-device dump is refused, not read as
        # "no devices".
        (("--capabilities", "caps-quirks.xml", "--nodedev", "caps-2socket-smt.xml"),
         "vmjob: Invalid value for --nodedev: caps-2socket-smt.xml: no <device> element under "
         "<capabilities>"),
    ],
)
def test_cli_inventory_bad_input_is_one_line_and_exit_2(args: tuple[str, ...],
                                                         message: str) -> None:
    done = vmjob("inventory", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_cli_inventory_unknown_host_in_config(tmp_path: Path) -> None:
    config = tmp_path / "vmjobs.yaml"
    config.write_text(f"spool: {tmp_path}\nhosts:\n  - {{name: a, uri: 'test:///default'}}\n")
    done = vmjob("inventory", "--capabilities", "caps-quirks.xml", "--config", str(config),
                 "--host", "b")
    assert done.returncode == 1
    assert done.stderr == "vmjob: unknown host 'b' (configured: a)\n"


def test_hosts_display_shows_iommu_groups_and_who_blocks_a_nic(pci: list[PciDevice]) -> None:
    nodes = parse_capabilities(read("caps-2socket-smt.xml"))
    host = build_host(HostConfig(name="h", uri="x"), nodes,
                      nic_devices(pci, ["14e4:16d8", CX5_PF]))
    cluster = Cluster([host])
    cluster.reserve("x", Allocation("h", (1,), 100, (NodeShare(0, (1,), 100),), (GROUP12[0],)))
    rows = usage_rows("h", cluster.free("h"))
    assert rows == [
        # 59179 + 63998 = 123177 MiB = 120.3 GiB; less the job's 100 MiB = 120.2 GiB
        ("h", "up", "1", "31/32", "120.2 GiB/120.3 GiB", "2/4"),
        ("  node0", "", "", "15/16", "57.7 GiB/57.8 GiB", "0/2"),
        ("    0000:02:00.0", "held", "x", "", "", "group 12"),
        ("    0000:02:00.1", "blocked", "", "", "",
         "group 12 (shares IOMMU group 12 with a NIC held by job x)"),
        ("  node1", "", "", "16/16", "62.5 GiB/62.5 GiB", "2/2"),
        ("    0000:d8:02.0", "free", "", "", "", f"group 141 VF of {CX5_PF}"),
        ("    0000:d8:02.1", "free", "", "", "", f"group 142 VF of {CX5_PF}"),
    ]


X550_HOST, X550_FREE = "0000:19:00.0", "0000:19:00.1"  # IOMMU group 31; .0 runs on ixgbe


def test_group_members_read_from_node_devices() -> None:
    device = parse_pci_device(read("nodedev-x550-vfio-fn1.xml"))
    assert device is not None
    assert device.group_members == (X550_HOST, X550_FREE)
    assert device.driver == "vfio-pci"


def test_nic_whose_group_the_host_uses_is_not_offered(pci: list[PciDevice]) -> None:
    # 19:00.1 is allowed and bound to vfio-pci, but 19:00.0 of its group 31 is the host's,
    # on ixgbe: VFIO cannot assign a group that is not wholly free of host drivers.
    assert nic_devices(pci, [X550_FREE]) == ()
    assert nic_notes(pci, [X550_FREE]) == [
        "NIC 0000:19:00.1 is not offered: IOMMU group 31 also holds 0000:19:00.0, which the "
        "host uses (driver ixgbe)"]
    # Offering both functions gives the whole group to jobs: both are offered.
    both = nic_devices(pci, ["8086:1563"])
    assert [d.address for d in both] == [X550_HOST, X550_FREE]
    assert nic_notes(pci, ["8086:1563"]) == []


def test_a_bridge_or_unbound_group_mate_does_not_block() -> None:
    nic = parse_pci_device(read("nodedev-x550-vfio-fn1.xml"))
    mate = parse_pci_device(read("nodedev-x550-host-fn0.xml"))
    assert nic is not None and mate is not None
    bridge = replace(mate, pci_class=0x060400, driver="pcieport")
    unbound = replace(mate, driver=None)
    stub = replace(mate, driver="pci-stub")
    for other in (bridge, unbound, stub):
        assert [d.address for d in nic_devices([nic, other], [X550_FREE])] == [X550_FREE]


def test_cli_inventory_notes_a_nic_left_out_for_its_group(tmp_path: Path) -> None:
    config = tmp_path / "vmjobs.yaml"
    config.write_text(f"spool: {tmp_path}\nhosts:\n"
                      f"  - {{name: a, uri: 'test:///default', nics: ['{X550_FREE}']}}\n")
    done = vmjob("inventory", "--capabilities", "caps-2socket-smt.xml",
                 "--nodedev", "nodedev-x550-host-fn0.xml", "--nodedev", "nodedev-x550-vfio-fn1.xml",
                 "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert [n["devices"] for n in view["nodes"]] == [[], []]
    assert view["notes"] == [
        "NIC 0000:19:00.1 is not offered: IOMMU group 31 also holds 0000:19:00.0, which the "
        "host uses (driver ixgbe)"]


def test_cli_inventory_notes_allow_listed_nics_missing_from_the_dumps(tmp_path: Path) -> None:
    """An allow-listed address with no dump, and a PF (which stands for its VFs) given without
    its VFs' dumps: no NIC is offered, and two notes say why instead of nothing."""
    config = tmp_path / "vmjobs.yaml"
    config.write_text(f"spool: {tmp_path}\nhosts:\n"
                      "  - {name: a, uri: 'test:///default', "
                      "nics: ['0000:D8:00.0', '0000:3b:00.0']}\n")
    done = vmjob("inventory", "--capabilities", "caps-2socket-smt.xml",
                 "--nodedev", "nodedev-cx5-pf-sriov.xml", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert [n["devices"] for n in view["nodes"]] == [[], []]
    assert view["notes"] == [
        "NIC 0000:3b:00.0 of the allow-list is not among the devices given",
        "NIC 0000:d8:00.0 stands for its VFs; 0000:d8:02.0, 0000:d8:02.1 not among the "
        "devices given"]


def test_cli_inventory_reads_several_devices_under_one_root(tmp_path: Path) -> None:
    # What the --help example makes: every `virsh nodedev-dumpxml` output inside <devices>.
    bundle = tmp_path / "pci.xml"
    bundle.write_text("<devices>\n" + read("nodedev-cx5-vf0.xml") + read("nodedev-nvme.xml")
                      + read("nodedev-bcm57416-group12-fn1.xml") + "</devices>\n")
    done = vmjob("inventory", "--capabilities", "caps-2socket-smt.xml", "--nodedev",
                 str(bundle), "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    # the NVMe disk is no network device
    assert [[d["address"] for d in n["devices"]] for n in view["nodes"]] == [
        [GROUP12[1]], [CX5_VF0]]


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("--capabilities", "<capabilities><host><topology><cells><cell id='x'/></cells>"
         "</topology></host></capabilities>",
         "capabilities: malformed number (invalid literal for int() with base 10: 'x')"),
        ("--capabilities", "<capabilities><host><topology><cells><cell id='0'><cpus>"
         "<cpu id='0' siblings='0-zz'/></cpus></cell></cells></topology></host></capabilities>",
         "capabilities: malformed number"),
        ("--nodedev", "<device><capability type='pci'><bus>zz</bus></capability></device>",
         "node device: malformed number (invalid literal for int() with base 0: 'zz')"),
    ],
)
def test_cli_inventory_malformed_numbers(tmp_path: Path, option: str, text: str,
                                         message: str) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(text)
    caps = str(DATA / "caps-quirks.xml") if option == "--nodedev" else str(bad)
    args = ("--capabilities", caps) + (("--nodedev", str(bad)) if option == "--nodedev" else ())
    done = vmjob("inventory", *args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"vmjob: Invalid value for {option}: {bad}: {message}")
