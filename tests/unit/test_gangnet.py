"""The gang network's pure parts (vmjobs.gangnet, gangmember): slots, addresses, names, the
guest's files, the member's NIC in the domain XML (checked by libvirt's test driver), where
host commands run, and the registry. The devices themselves are made and removed on the dev
cluster (tests/multihost/test_gang_network.py)."""

from __future__ import annotations

import ipaddress
import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from tests.libvirt_test.domain_specs import SPECS
from vmjobs import gangnet, guest_protocol
from vmjobs.config import HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.gangnet import GangNet, HostNet, Member
from vmjobs.virt import domain_xml


def net(slot: int = 0x12, n: int = 3) -> GangNet:
    return GangNet("g1", slot, tuple(Member(i, f"h{i + 1}") for i in range(n)))


def test_addresses_names_and_vni_come_from_the_slot() -> None:
    g = net(0x12)
    assert g.subnet == ipaddress.IPv4Network("10.64.18.0/24")
    assert [g.address(i) for i in range(3)] == ["10.64.18.1", "10.64.18.2", "10.64.18.3"]
    assert g.peers() == "10.64.18.1 10.64.18.2 10.64.18.3"
    assert g.mac(2) == "52:54:00:00:12:02"
    assert (g.bridge, g.vxlan, g.vni) == ("vjgb0012", "vjgx0012", 0x7A0012)
    last = net(gangnet.SLOTS - 1)
    assert last.subnet.subnet_of(gangnet.POOL) and last.vni < 1 << 24
    assert len(last.bridge) <= 15  # IFNAMSIZ - 1


def test_distinct_slots_never_share_subnet_vni_or_mac() -> None:
    nets = [net(s) for s in (0, 1, 255, 256, gangnet.SLOTS - 1)]
    assert len({n.subnet for n in nets}) == len({n.vni for n in nets}) == len(nets)
    assert len({n.mac(0) for n in nets}) == len(nets)


def test_guest_files() -> None:
    files = gangnet.guest_files(net(0x12, 2), 1)
    assert files == {"mac": b"52:54:00:00:12:01\n", "address": b"10.64.18.2/24\n",
                     "mtu": b"1450\n", "hosts": b"10.64.18.1 node0\n10.64.18.2 node1\n"}


def test_member_nic_in_the_domain_xml_and_libvirt_accepts_it() -> None:
    spec = replace(SPECS["1node-emulated-nic"](), gang_nic=gangnet.bridge_nic(net(0x12), 1),
                   control_channel=True)
    xml = domain_xml.build(spec)
    root = ET.fromstring(xml)
    nic = root.find("./devices/interface[@type='bridge']")
    assert nic is not None
    assert nic.find("source").get("bridge") == "vjgb0012"  # type: ignore[union-attr]
    assert nic.find("mac").get("address") == "52:54:00:00:12:01"  # type: ignore[union-attr]
    assert nic.find("mtu").get("size") == "1450"  # type: ignore[union-attr]
    assert nic.find("address").get("slot") == "0x0e"  # type: ignore[union-attr]
    names = [t.get("name") for t in root.findall("./devices/channel/target")]
    assert domain_xml.CONTROL_CHANNEL in names
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(xml)  # the test driver parses and validates the whole domain
        defined = ET.fromstring(dom.XMLDesc(0))
        assert defined.find("./devices/interface/source").get("bridge") == "vjgb0012"  # type: ignore[union-attr]
        dom.undefine()
    finally:
        conn.close()


def test_gang_files_go_in_the_job_archive_and_bad_paths_are_refused() -> None:
    spec = guest_protocol.JobSpec(job_id="g1.0", argv=("true",), env={}, cpus=1, memory_mib=64,
                                  extra_files={"vmjob/net/mac": (b"x", 0o644),
                                               "vmjob/bin/vmjob-ctl": (b"\x7fELF", 0o755)})
    names = {e.name: e for e in guest_protocol.job_entries(spec)}
    assert {"vmjob/net", "vmjob/bin", "vmjob/net/mac", "vmjob/bin/vmjob-ctl"} <= set(names)
    for bad in ("etc/passwd", "vmjob/net/../../etc/passwd", "vmjob/env/PATH"):
        with pytest.raises(VmjobsError, match="bad vmjob file"):
            guest_protocol.job_entries(replace(spec, extra_files={bad: (b"x", 0o644)}))


def test_where_host_commands_run() -> None:
    local = gangnet.host_net(HostConfig("a", "qemu:///system", gang_underlay="192.0.2.1"))
    assert local.argv(["ip", "link"]) == ["ip", "link"]
    dev = gangnet.host_net(HostConfig("h1", "qemu+tcp://10.231.0.11/system",
                                      gang_underlay="10.231.0.11", gang_netns="vmj-dev-h1"))
    assert dev.argv(["ip", "link"]) == ["ip", "netns", "exec", "vmj-dev-h1", "ip", "link"]
    remote = gangnet.host_net(HostConfig("n7", "qemu+ssh://admin@node7/system",
                                         gang_underlay="192.0.2.7"))
    assert remote.argv(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vjgx0001"]) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "admin@node7", "--",
        "bridge fdb append 00:00:00:00:00:00 dev vjgx0001"]


def test_a_remote_member_host_without_an_underlay_is_refused(tmp_path: Path) -> None:
    nets = {"h1": HostNet("h1", None, netns="nonexistent-ns"),
            "h2": HostNet("h2", None, netns="nonexistent-ns")}
    with pytest.raises(gangnet.GangNetError):
        gangnet.create(tmp_path, nets, "g1", [(0, "h1"), (1, "h2")])
    assert gangnet.networks(tmp_path) == []  # nothing registered after a failed create


def test_members_must_be_indexed_from_zero(tmp_path: Path) -> None:
    with pytest.raises(gangnet.GangNetError, match="0..N-1"):
        gangnet.create(tmp_path, {}, "g1", [(1, "h1"), (2, "h2")])


def test_registry_slots_and_orphans(tmp_path: Path) -> None:
    """Slots start at a hash of the gang id and skip taken ones; `orphans` lists the
    networks of gangs that are not live."""
    registry = tmp_path / "gangnet"
    registry.mkdir()
    start = gangnet.first_slot("g1")
    taken = GangNet("other", start, (Member(0, "h1"),))
    (registry / f"{start:04x}.json").write_text(json.dumps(taken.to_json()))
    (registry / "junk.json").write_text("{not json")  # ignored, not fatal
    # a gang on one host needs no VXLAN and no underlay: only the bridge (in a netns that
    # does not exist here, so the create fails after choosing its slot)
    with pytest.raises(gangnet.GangNetError):
        gangnet.create(tmp_path, {"h1": HostNet("h1", None, netns="nonexistent-ns")}, "g1",
                       [(0, "h1")])
    assert [n.gang_id for n in gangnet.networks(tmp_path)] == ["other"]
    assert [n.gang_id for n in gangnet.orphans(tmp_path, live=["other"])] == []
    assert [n.gang_id for n in gangnet.orphans(tmp_path, live=[])] == ["other"]
    assert GangNet.from_json(taken.to_json()) == taken
