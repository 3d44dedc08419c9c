"""Pure parts of migration and the smoke test: the destination XML and the tick checks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from placement import Allocation, NodeShare
from vmjobs.smoke import Tick, check_ticks, gap_around
from vmjobs.virt import domain_xml
from vmjobs.virt.domain_xml import DomainSpec
from vmjobs.virt.migration import MigrationFailed, retarget_xml


def _alloc(host: str, cpus: tuple[int, ...], node: int = 0) -> Allocation:
    return Allocation(host=host, cpus=cpus, memory_mib=256,
                      nodes=(NodeShare(node=node, cpus=cpus, memory_mib=256),))


def _xml(alloc: Allocation) -> str:
    return domain_xml.build(DomainSpec(
        name="vmjob-x", job_id="x", owner="u", owner_uid=1, virt_type="qemu", allocation=alloc,
        kernel=Path("/k"), initrd=Path("/i"), console_log=Path("/spool/jobs/x/console.a.log"),
        output_disk=Path("/spool/jobs/x/output.raw"), clock_channel=True))


def test_retarget_repins_rebinds_and_moves_the_console() -> None:
    source = _xml(_alloc("a", (0, 1)))
    dest = ET.fromstring(retarget_xml(source, _alloc("b", (6, 7), node=1), frozenset({2}),
                                      Path("/spool/jobs/x/console.b.log")))
    pins = {p.get("vcpu"): p.get("cpuset") for p in dest.findall("./cputune/vcpupin")}
    assert pins == {"0": "6", "1": "7"}
    assert dest.find("./cputune/emulatorpin").get("cpuset") == "2"
    assert dest.find("./numatune/memory").get("nodeset") == "1"
    assert dest.find("./numatune/memnode").get("nodeset") == "1"
    assert dest.find("./devices/serial/source").get("path") == "/spool/jobs/x/console.b.log"
    # the output disk, the clock channel and the guest's cells stay as they were
    assert dest.find("./devices/disk/source").get("file") == "/spool/jobs/x/output.raw"
    assert dest.find("./devices/channel/target").get("name") == domain_xml.CLOCK_CHANNEL
    meta = domain_xml.read_metadata(ET.tostring(dest, encoding="unicode"))
    assert meta is not None and meta.allocation == _alloc("b", (6, 7), node=1)
    # element order is kept: libvirt compares the guest ABI, not the order, but stay tidy
    tags = [child.tag for child in dest]
    assert tags.index("cputune") < tags.index("numatune") < tags.index("os")


def test_retarget_refuses_a_different_guest_numa_layout() -> None:
    source = _xml(_alloc("a", (0, 1)))
    split = Allocation(host="b", cpus=(0, 8), memory_mib=256,
                       nodes=(NodeShare(0, (0,), 128), NodeShare(1, (8,), 128)))
    with pytest.raises(MigrationFailed, match="NUMA"):
        retarget_xml(source, split, frozenset(), None)
    with pytest.raises(MigrationFailed, match="vCPUs"):
        retarget_xml(source, _alloc("b", (3,)), frozenset(), None)


def _ticks(rows: list[tuple[int, int, int]]) -> list[Tick]:
    return [Tick(c, tsc, mono, 0, end=(i + 1) * 10) for i, (c, tsc, mono) in enumerate(rows)]


def test_tick_checks_catch_skips_repeats_and_clocks_going_back() -> None:
    good = _ticks([(0, 10, 100), (1, 20, 200), (2, 30, 300)])
    assert check_ticks(good) == []
    assert check_ticks(_ticks([(0, 10, 100), (2, 20, 200)])) == [
        "counter skipped from 0 to 2"]
    assert check_ticks(_ticks([(0, 10, 100), (0, 20, 200)])) == ["tick 0 repeated"]
    assert check_ticks(_ticks([(0, 10, 100), (1, 5, 200)])) == [
        "TSC went backwards at tick 1"]
    assert check_ticks(_ticks([(0, 10, 100), (1, 20, 50)])) == [
        "CLOCK_MONOTONIC went backwards at tick 1"]


def test_gap_around_a_switch_over() -> None:
    ticks = _ticks([(i, i, i * 100_000_000 + (400_000_000 if i >= 5 else 0))
                    for i in range(10)])
    assert gap_around(ticks, boundary=45) == pytest.approx(500.0)


GOLDEN = Path(__file__).parents[1] / "data" / "migration"
# case -> (destination allocation, the destination's reserved cpus for the emulator)
RETARGETS = {
    "1cpu": (Allocation(host="h2", cpus=(5,), memory_mib=128,
                        nodes=(NodeShare(1, (5,), 128),)), frozenset[int]()),
    "2cpus": (Allocation(host="h3", cpus=(2, 3), memory_mib=256,
                         nodes=(NodeShare(0, (2, 3), 256),)), frozenset({0})),
}


@pytest.mark.parametrize("case", sorted(RETARGETS))
def test_retarget_golden(case: str) -> None:
    """A real libvirt's migratable XML of a job's guest (captured from libvirtd 9.0 with
    XMLDesc(VIR_DOMAIN_XML_MIGRATABLE)) -> the destination XML, checked in whole: pins,
    emulator pin, host nodeset, metadata and both console sources change; nothing else."""
    alloc, emulator = RETARGETS[case]
    source = (GOLDEN / f"retarget-{case}-in.xml").read_text()
    console = Path(f"/var/spool/vmjobs/jobs/{case}/console.{alloc.host}.log")
    got = retarget_xml(source, alloc, emulator, console)
    want = (GOLDEN / f"retarget-{case}-out.xml").read_text()
    assert _shape(ET.fromstring(got)) == _shape(ET.fromstring(want))
    # and retargeting its own output for the same place changes nothing more
    again = retarget_xml(got, alloc, emulator, console)
    assert _shape(ET.fromstring(again)) == _shape(ET.fromstring(want))


def _shape(element: ET.Element) -> tuple[object, ...]:
    """An element as nested values: namespaced tag, attributes, text, children in order
    (whatever prefixes and indentation the serializer chose)."""
    return (element.tag, sorted(element.attrib.items()), (element.text or "").strip(),
            [_shape(child) for child in element])
