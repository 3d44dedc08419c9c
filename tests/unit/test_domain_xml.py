"""Domain XML for a job (vmjobs.virt.domain_xml): golden files, structure, metadata round trip.

Regenerate the golden files with `VMJOBS_REGEN_GOLDEN=1 python -m pytest tests/unit` and read
the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement import Allocation, NodeShare
from tests.libvirt_test.domain_specs import SPECS
from vmjobs.units import parse_cpu_list
from vmjobs.virt.domain_xml import (
    FIRST_NIC_SLOT,
    MAX_NICS,
    METADATA_NS,
    OUTPUT_DISK_SLOT,
    DomainMetadata,
    DomainSpec,
    Nic,
    PciAddress,
    build,
    guest_nic_address,
    read_metadata,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SPEC_NAMES = sorted(SPECS)


def check_golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("VMJOBS_REGEN_GOLDEN") == "1":
        path.write_text(text + "\n")
    assert path.exists(), f"{path} is missing: run with VMJOBS_REGEN_GOLDEN=1 to write it"
    assert text + "\n" == path.read_text()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_golden(name: str) -> None:
    check_golden(f"domain-{name}.xml", build(SPECS[name]()))


def test_build_is_deterministic() -> None:
    for make in SPECS.values():
        assert build(make()) == build(make())


# --- structure -----------------------------------------------------------------------------


def pci(element: ET.Element | None) -> PciAddress:
    assert element is not None
    return PciAddress(*(int(element.get(part, ""), 16)
                        for part in ("domain", "bus", "slot", "function")))


def check_structure(spec: DomainSpec, xml: str) -> None:
    """Everything DESIGN.md asks of a job's domain, read back from the XML text."""
    alloc = spec.allocation
    root = ET.fromstring(xml)
    assert root.tag == "domain"
    assert root.get("type") == spec.virt_type
    assert root.findtext("name") == spec.name

    memory = root.find("memory")
    assert memory is not None and memory.get("unit") == "MiB"
    assert int(memory.text or "") == alloc.memory_mib
    vcpu = root.find("vcpu")
    assert vcpu is not None and int(vcpu.text or "") == len(alloc.cpus)

    # one vcpupin per vCPU, each on one of the allocation's cpus, in the allocation's order
    pins = root.findall("cputune/vcpupin")
    assert [(int(p.get("vcpu", "")), p.get("cpuset")) for p in pins] == [
        (i, str(c)) for i, c in enumerate(alloc.cpus)]
    assert {int(p.get("cpuset", "")) for p in pins} == set(alloc.cpus)
    emulator = root.findall("cputune/emulatorpin")
    assert len(emulator) == 1
    expected_emulator = spec.emulator_cpus or frozenset(alloc.cpus)
    assert parse_cpu_list(emulator[0].get("cpuset", "")) == expected_emulator
    # the emulator never runs on cpus kept idle for isolation
    assert not parse_cpu_list(emulator[0].get("cpuset", "")) & set(alloc.idle_cpus)
    assert not {int(p.get("cpuset", "")) for p in pins} & set(alloc.idle_cpus)

    # memory strictly from the allocation's host nodes, one memnode per guest cell
    (mem_tune,) = root.findall("numatune/memory")
    assert mem_tune.get("mode") == "strict"
    assert parse_cpu_list(mem_tune.get("nodeset", "")) == {s.node for s in alloc.nodes}
    memnodes = root.findall("numatune/memnode")
    assert [(m.get("cellid"), m.get("mode"), m.get("nodeset")) for m in memnodes] == [
        (str(i), "strict", str(s.node)) for i, s in enumerate(alloc.nodes)]

    # guest NUMA cells mirror the host nodes: their vCPUs run there, their memory sums up
    cells = root.findall("cpu/numa/cell")
    assert [c.get("id") for c in cells] == [str(i) for i in range(len(alloc.nodes))]
    assert all(c.get("unit") == "MiB" for c in cells)
    assert sum(int(c.get("memory", "")) for c in cells) == alloc.memory_mib
    guest_vcpus = [parse_cpu_list(c.get("cpus", "")) for c in cells]
    assert sorted(v for vs in guest_vcpus for v in vs) == list(range(len(alloc.cpus)))
    for vcpus, share in zip(guest_vcpus, alloc.nodes, strict=True):
        assert {alloc.cpus[v] for v in vcpus} == set(share.cpus)
    topology = root.find("cpu/topology")
    assert topology is not None
    assert int(topology.get("sockets", "")) * int(topology.get("cores", "")) * int(
        topology.get("threads", "")) == len(alloc.cpus)
    assert (root.find("cpu").get("mode") == "host-passthrough") == (  # type: ignore[union-attr]
        spec.virt_type == "kvm")

    # hugepages only when asked, for exactly the guest's cells
    pages = root.findall("memoryBacking/hugepages/page")
    if alloc.hugepage_kib:
        (page,) = pages
        assert (page.get("size"), page.get("unit")) == (str(alloc.hugepage_kib), "KiB")
        assert parse_cpu_list(page.get("nodeset", "")) == set(range(len(alloc.nodes)))
    else:
        assert root.find("memoryBacking") is None

    # power: ACPI so the init's poweroff ends the domain, and nothing restarts it
    assert root.find("features/acpi") is not None
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_reboot") == "destroy"
    assert root.findtext("on_crash") == "destroy"

    # direct kernel boot
    assert root.findtext("os/kernel") == str(spec.kernel)
    assert root.findtext("os/initrd") == str(spec.initrd)
    cmdline = (root.findtext("os/cmdline") or "").split()
    assert {"console=ttyS0", "cryptomgr.notests", "no_timer_check"} <= set(cmdline)
    loader = root.find("os/loader")
    if spec.loader is None:
        assert loader is None  # QEMU's default firmware
    else:
        assert loader is not None and loader.get("type") == "rom"
        assert loader.text == str(spec.loader)
        # libvirt's order inside <os>: type, loader, then the direct kernel boot
        assert [e.tag for e in root.find("os")][:3] == ["type", "loader", "kernel"]  # type: ignore

    devices = root.find("devices")
    assert devices is not None
    # NICs: vfio passthrough or emulated, at the fixed guest addresses 00:10.0, 00:11.0, ...
    hostdevs = devices.findall("hostdev")
    interfaces = devices.findall("interface")
    vfio = [n for n in spec.nics if not n.emulated]
    emulated = [n for n in spec.nics if n.emulated]
    assert len(hostdevs) == len(vfio)
    assert len(interfaces) == len(emulated)
    for hostdev, nic in zip(hostdevs, vfio, strict=True):
        assert (hostdev.get("mode"), hostdev.get("type"), hostdev.get("managed")) == (
            "subsystem", "pci", "yes")
        assert hostdev.find("driver").get("name") == "vfio"  # type: ignore[union-attr]
        assert str(pci(hostdev.find("source/address"))) == nic.host_device
        guest = hostdev.find("address")
        assert guest is not None and guest.get("type") == "pci"
        assert pci(guest) == nic.guest_address
    for interface, nic in zip(interfaces, emulated, strict=True):
        assert interface.get("type") == "ethernet"
        assert interface.find("source") is None  # attached to nothing: no network
        assert pci(interface.find("address")) == nic.guest_address
    guest_slots = [pci(e.find("address")).slot for e in [*hostdevs, *interfaces]]
    assert sorted(guest_slots) == [FIRST_NIC_SLOT + i for i in range(len(spec.nics))]

    # the console goes to the job's log file; the output disk is the only disk
    (serial,) = devices.findall("serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == str(spec.console_log)  # type: ignore[union-attr]
    (disk,) = devices.findall("disk")
    assert disk.find("source").get("file") == str(spec.output_disk)  # type: ignore[union-attr]
    assert pci(disk.find("address")).slot == OUTPUT_DISK_SLOT
    # and nothing else a job did not ask for
    for absent in ("graphics", "video", "sound", "channel", "input", "rng", "filesystem"):
        assert devices.find(absent) is None, absent
    assert devices.find("memballoon").get("model") == "none"  # type: ignore[union-attr]

    assert read_metadata(xml) == DomainMetadata(spec.job_id, spec.owner, spec.owner_uid, alloc)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_structure(name: str) -> None:
    spec = SPECS[name]()
    check_structure(spec, build(spec))


def test_single_node_on_host_node_1_maps_guest_cell_0() -> None:
    spec = SPECS["1node-hugepages-isolated"]()
    root = ET.fromstring(build(spec))
    assert root.find("numatune/memory").get("nodeset") == "1"  # type: ignore[union-attr]
    memnode = root.find("numatune/memnode")
    assert (memnode.get("cellid"), memnode.get("nodeset")) == ("0", "1")  # type: ignore
    # hugepage nodesets name guest cells: host node 1 is guest cell 0 here
    page = root.find("memoryBacking/hugepages/page")
    assert page.get("nodeset") == "0"  # type: ignore[union-attr]


def test_no_interface_without_nics() -> None:
    spec = SPECS["1node-hugepages-isolated"]()
    assert spec.nics == ()
    root = ET.fromstring(build(spec))
    assert root.find("devices/interface") is None
    assert root.find("devices/hostdev") is None


def test_emulator_on_job_cpus_without_reserved_cores() -> None:
    spec = SPECS["1node-emulated-nic"]()
    assert spec.emulator_cpus == frozenset()
    root = ET.fromstring(build(spec))
    assert root.find("cputune/emulatorpin").get("cpuset") == "9-10"  # type: ignore[union-attr]


# --- metadata and random allocations -------------------------------------------------------


def test_read_metadata_of_a_domain_that_is_not_ours() -> None:
    assert read_metadata("<domain type='kvm'><name>other</name></domain>") is None
    assert read_metadata(
        "<domain type='kvm'><name>x</name><metadata>"
        "<app:thing xmlns:app='urn:example:app'/></metadata></domain>") is None
    # our job element without an allocation is no job we can account for
    assert read_metadata(
        f"<domain><metadata><vmjob:job xmlns:vmjob='{METADATA_NS}' id='x' owner='o' uid='1'/>"
        "</metadata></domain>") is None


def test_read_metadata_does_not_depend_on_the_prefix() -> None:
    # libvirt rewrites the namespace prefix (ns0:...) when it stores the metadata
    xml = build(SPECS["2nodes-vfio-hugepages"]()).replace("vmjob:", "ns0:").replace(
        "xmlns:vmjob=", "xmlns:ns0=")
    assert "vmjob:" not in xml
    meta = read_metadata(xml)
    assert meta is not None and meta.job_id == "deadbeef"


names = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)


@st.composite
def allocations(draw: st.DrawFn) -> Allocation:
    node_ids = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True))
    cpu_pool = draw(st.lists(st.integers(0, 255), min_size=len(node_ids) + 2,
                             max_size=len(node_ids) * 6, unique=True))
    # each node gets at least one of the cpus; the rest may be kept idle
    per_node = len(cpu_pool) // (len(node_ids) + 1)
    shares, cpus = [], []
    for i, node in enumerate(node_ids):
        mine = tuple(cpu_pool[i * per_node:(i + 1) * per_node]) or (cpu_pool[i],)
        shares.append(NodeShare(node=node, cpus=mine, memory_mib=draw(st.integers(1, 1 << 20))))
        cpus.extend(mine)
    idle = tuple(c for c in cpu_pool[len(node_ids) * per_node:] if c not in cpus)
    order = draw(st.permutations(cpus))  # vCPU i may run on any of them
    devices = draw(st.lists(
        st.one_of(
            st.builds("0000:{:02x}:{:02x}.{}".format, st.integers(1, 255), st.integers(0, 31),
                      st.integers(0, 7)),
            names.map(lambda n: f"emulated:{n}"),
        ), max_size=MAX_NICS, unique=True))
    return Allocation(
        host=draw(names), cpus=tuple(order), memory_mib=sum(s.memory_mib for s in shares),
        nodes=tuple(shares), devices=tuple(devices),
        hugepage_kib=draw(st.sampled_from([None, 2048, 1048576])),
        idle_cpus=idle if draw(st.booleans()) else (),
    )


@settings(max_examples=150, deadline=None)
@given(alloc=allocations(), owner=names, uid=st.integers(0, 1 << 31),
       job_id=st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
       virt_type=st.sampled_from(["kvm", "qemu"]),
       emulator=st.frozensets(st.integers(0, 255), max_size=4))
def test_random_allocations(alloc: Allocation, owner: str, uid: int, job_id: str,
                            virt_type: str, emulator: frozenset[int]) -> None:
    spec = DomainSpec(
        name=f"vmjob-{job_id}", job_id=job_id, owner=owner, owner_uid=uid, virt_type=virt_type,
        allocation=alloc, kernel=Path("/spool/images/k"), initrd=Path(f"/spool/{job_id}/initrd"),
        console_log=Path(f"/spool/{job_id}/console.{alloc.host}.log"),
        output_disk=Path(f"/spool/{job_id}/output.raw"),
        emulator_cpus=emulator - set(alloc.idle_cpus),
        nics=tuple(Nic(guest_nic_address(i), d) for i, d in enumerate(alloc.devices)),
    )
    xml = build(spec)
    check_structure(spec, xml)
    meta = read_metadata(xml)
    assert meta == DomainMetadata(job_id, owner, uid, alloc)


# --- small pieces --------------------------------------------------------------------------


def test_guest_nic_addresses() -> None:
    assert str(guest_nic_address(0)) == "0000:00:10.0"
    assert str(guest_nic_address(1)) == "0000:00:11.0"
    assert str(guest_nic_address(MAX_NICS - 1)) == "0000:00:1f.0"
    for bad in (-1, MAX_NICS):
        with pytest.raises(ValueError):
            guest_nic_address(bad)
    # NICs never collide with the output disk's slot
    assert OUTPUT_DISK_SLOT not in range(FIRST_NIC_SLOT, FIRST_NIC_SLOT + MAX_NICS)


@pytest.mark.parametrize("text", ["0000:3b:00.0", "0000:af:00.1", "0001:00:1f.7"])
def test_pci_address_round_trip(text: str) -> None:
    assert str(PciAddress.parse(text)) == text
    element = PciAddress.parse(text).element()
    assert element.get("type") == "pci"
    assert pci(element) == PciAddress.parse(text)
    assert "type" not in PciAddress.parse(text).element(with_type=False).attrib


def test_nic_kind() -> None:
    assert Nic(guest_nic_address(0), "emulated:enic0").emulated
    assert not Nic(guest_nic_address(0), "0000:3b:00.0").emulated


# --- libvirt's own schema -------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None,
                    reason="virt-xml-validate (libvirt-clients) is not installed")
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_validates_against_libvirt_schema(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.xml"
    path.write_text(build(SPECS[name]()))
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout



def test_the_output_port_is_a_pipe_qemu_writes_and_a_move_retargets_it() -> None:
    from dataclasses import replace

    from vmjobs.virt.domain_xml import OUTPUT_CHANNEL, build
    from vmjobs.virt.migration import retarget_xml

    spec = replace(SPECS["1node-emulated-nic"](), output_pipe=Path("/spool/jobs/j/output.0"))
    root = ET.fromstring(build(spec))
    channels = [c for c in root.findall("./devices/channel")
                if c.find("target") is not None
                and c.find("target").get("name") == OUTPUT_CHANNEL]  # type: ignore[union-attr]
    assert len(channels) == 1
    assert channels[0].get("type") == "pipe"  # not "file": no log daemon, no rotation
    assert channels[0].find("source").get("path") == "/spool/jobs/j/output.0"  # type: ignore[union-attr]
    assert channels[0].find("target").get("type") == "virtio"  # type: ignore[union-attr]
    moved = ET.fromstring(retarget_xml(build(spec), spec.allocation, frozenset(), None,
                                       Path("/spool/jobs/j/output.1")))
    paths = [c.find("source").get("path")  # type: ignore[union-attr]
             for c in moved.findall("./devices/channel[@type='pipe']")]
    assert paths == ["/spool/jobs/j/output.1"]
