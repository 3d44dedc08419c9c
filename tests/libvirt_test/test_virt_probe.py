"""The KVM probe (`virt_type: auto`) runs one at a time per host and leaves no domain behind,
paused ones included. libvirt's test driver stands in for the host: its guests never end, so
each probe runs to its timeout (or pauses, as a KVM internal error leaves it)."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from placement import Allocation, NodeShare
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.config import Config, parse
from vmjobs.image import Image
from vmjobs.virt import probe

URI = "test:///default"
ALLOC = Allocation(host="a", cpus=(1,), memory_mib=256,
                   nodes=(NodeShare(node=0, cpus=(1,), memory_mib=256),))


def probes(conn: libvirt.virConnect) -> list[str]:
    return [d.name() for d in conn.listAllDomains() if d.name().startswith("vmjob-probe")]


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    connection = libvirt.open(URI)
    yield connection
    for name in probes(connection):
        connection.lookupByName(name).destroy()
    connection.close()


@pytest.fixture
def image(tmp_path: Path) -> Image:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"base initramfs")
    return Image(id="img", name="test", kernel=tmp_path / "vmlinuz",
                 initrd=tmp_path / "initrd", kernel_version="6.1", size_bytes=1)


def config(spool: Path) -> Config:
    return parse({"spool": str(spool), "virt_type": "auto", "kvm_probe_timeout": 1,
                  "hosts": [{"name": "a", "uri": URI}]}, "test")


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Start probe guests on the test driver; for each probe guest that started, the probe
    domains alive on the host just before (a start refused because one exists is not one)."""
    seen: list[list[str]] = []

    def start(connection: libvirt.virConnect, xml: str) -> libvirt.virDomain:
        before = probes(connection)
        dom = connection.createXML(for_test_driver(xml), 0)
        seen.append(before)
        return dom

    monkeypatch.setattr(probe, "start", start)
    monkeypatch.setattr(probe, "kvm_offered", lambda _conn: True)
    return seen


def test_a_probe_guest_that_pauses_is_destroyed(conn: libvirt.virConnect, image: Image,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def start_then_pause(connection: libvirt.virConnect, xml: str) -> libvirt.virDomain:
        dom = connection.createXML(for_test_driver(xml), 0)
        dom.suspend()  # what "KVM internal error" does to the guest
        return dom

    monkeypatch.setattr(probe, "start", start_then_pause)
    assert probe.probe_boot(config(tmp_path / "spool"), conn, image, ALLOC) is False
    assert probes(conn) == []
    assert not (tmp_path / "spool" / "probe" / "run-a").exists()


def test_a_leftover_paused_probe_is_destroyed_before_the_next_probe(
        conn: libvirt.virConnect, image: Image, tmp_path: Path,
        starts: list[list[str]]) -> None:
    xml = ET.parse(Path(__file__).parents[1] / "data" / "domain-1node-emulated-nic.xml")
    name = xml.find("name")
    assert name is not None
    name.text = "vmjob-probe"  # as a crashed probe of another spool left it
    leftover = conn.createXML(for_test_driver(ET.tostring(xml.getroot(), encoding="unicode")),
                              0)
    assert leftover.name() == "vmjob-probe"
    leftover.suspend()
    assert probe.virt_type(config(tmp_path / "spool"), config(tmp_path).hosts[0], conn,
                           image, ALLOC, lambda _m: None) == "qemu"
    assert starts == [[]]  # the leftover was gone before the probe started
    assert probes(conn) == []


def test_probes_at_once_run_one_at_a_time_and_one_spool_probes_once(
        conn: libvirt.virConnect, image: Image, tmp_path: Path,
        starts: list[list[str]]) -> None:
    # two threads of one spool (a daemon launching two jobs) and one of another spool
    spools = [tmp_path / "one", tmp_path / "one", tmp_path / "other"]
    results: list[str] = []
    failures: list[BaseException] = []

    def run_probe(spool: Path) -> None:
        cfg = config(spool)
        try:
            own = libvirt.open(URI)
            try:
                results.append(probe.virt_type(cfg, cfg.hosts[0], own, image, ALLOC,
                                               lambda _m: None))
            finally:
                own.close()
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=run_probe, args=(s,)) for s in spools]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert results == ["qemu"] * 3
    assert starts == [[], []]  # one probe per spool, never two guests at once
    assert probes(conn) == []
