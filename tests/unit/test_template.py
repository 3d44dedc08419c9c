"""Warm start pieces that need no guest (vmjobs.template): the template key, the job's DEST
XML, the save image header rewrite and the job port's input."""

from __future__ import annotations

import gzip
import io
import struct
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from placement import Allocation, NodeShare
from vmjobs import template
from vmjobs.config import parse as parse_config
from vmjobs.errors import ConfigError
from vmjobs.guest_protocol import JobSpec
from vmjobs.virt import domain_xml
from vmjobs.virt.domain_xml import CLOCK_CHANNEL, JOB_CHANNEL, METADATA_NS, DomainSpec
from vmjobs.virt.migration import MigrationFailed

ONE_CELL = Allocation(host="h1", cpus=(2, 3), memory_mib=512,
                      nodes=(NodeShare(node=0, cpus=(2, 3), memory_mib=512),))
TWO_CELLS = Allocation(host="h1", cpus=(1, 5), memory_mib=512,
                       nodes=(NodeShare(node=0, cpus=(1,), memory_mib=256),
                              NodeShare(node=1, cpus=(5,), memory_mib=256)))
HOST = {"qemu": 7002000, "libvirt": 9000000}


def inputs(**changes: object) -> dict[str, object]:
    base = template.template_inputs("cdcb6c4e27ea7889", template.Shape.of(ONE_CELL, 256),
                                    "qemu", HOST, helper="0123456789abcdef")
    base.update(changes)
    return base


def test_the_key_is_stable_and_ignores_the_order_of_the_inputs() -> None:
    a = inputs()
    b = dict(reversed(list(a.items())))
    assert template.template_key(a) == template.template_key(b)
    assert len(template.template_key(a)) == 16


@pytest.mark.parametrize("change", [
    {"image": "ffffffffffffffff"}, {"vcpus": 3}, {"memory_mib": 1024},
    {"cells": [["0", 256], ["1", 256]]}, {"output_disk_mib": 512}, {"virt_type": "kvm"},
    {"cmdline": "console=ttyS0"}, {"helper": "fedcba9876543210"},
    {"host": {"qemu": 8000000, "libvirt": 9000000}},
    {"host": {"qemu": 7002000, "libvirt": 9000000, "host_cpu": "abcd"}},
])
def test_anything_the_saved_guest_depends_on_changes_the_key(change: dict[str, object]) -> None:
    assert template.template_key(inputs(**change)) != template.template_key(inputs())


def test_a_guest_with_a_balloon_is_another_template() -> None:
    def with_balloon(period: int | None) -> str:
        return template.template_key(template.template_inputs(
            "cdcb6c4e27ea7889", template.Shape.of(ONE_CELL, 256), "qemu", HOST,
            helper="0123456789abcdef", balloon_period_s=period))

    assert with_balloon(None) == template.template_key(inputs())  # as before balloons
    assert len({with_balloon(None), with_balloon(1), with_balloon(10)}) == 3


def test_the_shape_follows_the_guest_cells_not_the_host_cpus() -> None:
    moved = replace(ONE_CELL, cpus=(0, 1), nodes=(NodeShare(node=1, cpus=(0, 1),
                                                            memory_mib=512),))
    assert template.Shape.of(moved, 256) == template.Shape.of(ONE_CELL, 256)
    assert template.Shape.of(TWO_CELLS, 256).cells == (("0", 256), ("1", 256))
    assert template.Shape.of(ONE_CELL, 256).cells == (("0-1", 512),)


def test_jobs_with_nics_or_hugepages_start_cold() -> None:
    assert template.why_cold(ONE_CELL) is None
    assert template.why_cold(replace(ONE_CELL, devices=("emulated:e0",))) == "the job has NICs"
    assert template.why_cold(replace(ONE_CELL, hugepage_kib=2048)) == "the job uses hugepages"


# --------------------------------------------------------------------------- the DEST XML


def template_xml(alloc: Allocation) -> str:
    """A template's XML as libvirt reports it from the save image: the domain we build plus
    a UUID and the clock port's socket path libvirt chose for the template."""
    xml = domain_xml.build(DomainSpec(
        name="vmjob-template-0123456789abcdef", job_id="template-0123456789abcdef",
        owner="vmjobs", owner_uid=0, virt_type="qemu", allocation=alloc,
        kernel=Path("/spool/images/x/vmlinuz"), initrd=Path("/spool/templates/k.initrd"),
        console_log=Path("/spool/templates/k.console.log"),
        output_disk=Path("/spool/templates/k.output.raw"), clock_channel=True,
        output_pipe=Path("/spool/templates/k.output"), job_pipe=Path("/spool/templates/k.job"),
    ))
    root = ET.fromstring(xml)
    uuid = ET.Element("uuid")
    uuid.text = "d335038b-c8c4-471b-beaf-83b50f1aa6ec"
    root.insert(1, uuid)
    for channel in root.findall("./devices/channel[@type='unix']"):
        channel.insert(0, ET.Element("source", mode="bind", path="/var/lib/libvirt/qemu/"
                                     "channel/target/domain-3-vmjob-template/clock"))
    return ET.tostring(root, encoding="unicode")


def job_metadata(alloc: Allocation) -> ET.Element:
    return domain_xml.metadata(DomainSpec(
        name="vmjob-j1", job_id="j1", owner="alice", owner_uid=1000, virt_type="qemu",
        allocation=alloc, kernel=Path("/k"), initrd=Path("/i"), console_log=Path("/c"),
        output_disk=Path("/o")))


def dest_for(alloc: Allocation, saved: str) -> tuple[str, str]:
    identity = template.with_identity(saved, "vmjob-j1", "8f7c3a52-0000-4000-8000-000000000001",
                                      job_metadata(alloc))
    dest = template.job_xml(identity, alloc, frozenset({0}), Path("/spool/jobs/j1/console.h1.log"),
                            Path("/spool/jobs/j1/output.0"), Path("/spool/jobs/j1/output.raw"),
                            Path("/spool/jobs/j1/job"))
    return identity, dest


def test_the_identity_is_the_jobs_and_nothing_else_changes() -> None:
    saved = template_xml(ONE_CELL)
    identity, _ = dest_for(ONE_CELL, saved)
    root, before = ET.fromstring(identity), ET.fromstring(saved)
    assert root.findtext("name") == "vmjob-j1"
    assert root.findtext("uuid") == "8f7c3a52-0000-4000-8000-000000000001"
    job = root.find(f"./metadata/{{{METADATA_NS}}}job")
    assert job is not None and (job.get("id"), job.get("owner"), job.get("uid")) == \
        ("j1", "alice", "1000")
    assert len(root.findall("metadata")) == 1
    for element in (root, before):
        for tag in ("name", "uuid", "metadata"):
            found = element.find(tag)
            assert found is not None
            element.remove(found)
    assert ET.tostring(root) == ET.tostring(before)


def test_the_dest_xml_carries_the_jobs_pinning_files_and_job_port() -> None:
    moved = replace(ONE_CELL, cpus=(6, 7), nodes=(NodeShare(node=1, cpus=(6, 7),
                                                            memory_mib=512),))
    identity, dest = dest_for(moved, template_xml(ONE_CELL))
    root = ET.fromstring(dest)
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.findall("./cputune/vcpupin")] == \
        [("0", "6"), ("1", "7")]
    assert root.find("./cputune/emulatorpin").get("cpuset") == "0"  # type: ignore[union-attr]
    assert root.find("./numatune/memory").get("nodeset") == "1"  # type: ignore[union-attr]
    assert root.find("./devices/serial/source").get("path") == \
        "/spool/jobs/j1/console.h1.log"  # type: ignore[union-attr]
    assert root.find("./devices/disk/source").get("file") == \
        "/spool/jobs/j1/output.raw"  # type: ignore[union-attr]
    pipes = {c.find("target").get("name"): c.find("source").get("path")  # type: ignore[union-attr]
             for c in root.findall("./devices/channel[@type='pipe']")}
    assert pipes == {domain_xml.OUTPUT_CHANNEL: "/spool/jobs/j1/output.0",
                     JOB_CHANNEL: "/spool/jobs/j1/job"}
    clock = root.find("./devices/channel[@type='unix']")
    assert clock is not None and clock.find("source") is None  # libvirt picks a path per guest
    assert clock.find("target").get("name") == CLOCK_CHANNEL  # type: ignore[union-attr]
    # the identity is the header's: libvirt compares the two and refuses any other change
    ident = ET.fromstring(identity)
    for tag in ("name", "uuid"):
        assert root.findtext(tag) == ident.findtext(tag)
    alloc = root.find(f"./metadata/{{{METADATA_NS}}}job/{{{METADATA_NS}}}allocation")
    assert alloc is not None and alloc.get("cpus") == "6,7"


def test_a_template_of_another_shape_is_refused() -> None:
    with pytest.raises(MigrationFailed):
        dest_for(TWO_CELLS, template_xml(ONE_CELL))
    three = replace(ONE_CELL, cpus=(1, 2, 3), nodes=(NodeShare(0, (1, 2, 3), 512),))
    with pytest.raises(MigrationFailed):
        dest_for(three, template_xml(ONE_CELL))


def test_a_template_without_a_job_port_is_refused() -> None:
    root = ET.fromstring(template_xml(ONE_CELL))
    devices = root.find("devices")
    assert devices is not None
    for channel in devices.findall("channel"):
        if channel.find("target").get("name") == JOB_CHANNEL:  # type: ignore[union-attr]
            devices.remove(channel)
    with pytest.raises(template.TemplateError, match=JOB_CHANNEL):
        dest_for(ONE_CELL, ET.tostring(root, encoding="unicode"))


# --------------------------------------------------------------------------- the save image


def fake_save(path: Path, xml: str, cookie: str, stream: bytes, pad: int = 65536) -> None:
    """A save image in libvirt's layout (qemu_saveimage.h, version 2): what virDomainSave
    wrote in tests/guest runs, with its 64 KiB of room after the XML."""
    body = xml.encode() + b"\0"
    data = body + cookie.encode() + b"\0"
    data_len = len(data) + pad
    header = struct.pack("<16s5I56x", b"LibvirtQemudSave", 2, data_len, 1, 0, len(body))
    path.write_bytes(header + data.ljust(data_len, b"\0") + stream)


def test_copy_save_rewrites_only_the_xml(tmp_path: Path) -> None:
    stream = b"QEVM" + bytes(range(256)) * 4000
    fake_save(tmp_path / "t.save", "<domain><name>t</name></domain>", "<cookie/>", stream)
    template.copy_save(tmp_path / "t.save", tmp_path / "j.save",
                       "<domain><name>vmjob-j1</name></domain>")
    with (tmp_path / "t.save").open("rb") as a, (tmp_path / "j.save").open("rb") as b:
        old, old_xml, old_cookie = template.read_save_header(a)
        new, new_xml, new_cookie = template.read_save_header(b)
    assert new_xml == "<domain><name>vmjob-j1</name></domain>"
    assert old_xml == "<domain><name>t</name></domain>"
    assert new_cookie == old_cookie == b"<cookie/>"
    assert (new.data_len, new.was_running, new.stream_offset) == \
        (old.data_len, old.was_running, old.stream_offset)
    copied = (tmp_path / "j.save").read_bytes()
    assert copied[new.stream_offset:] == stream
    assert (tmp_path / "j.save").stat().st_mode & 0o777 == 0o600


def test_copy_save_refuses_an_xml_larger_than_the_room(tmp_path: Path) -> None:
    fake_save(tmp_path / "t.save", "<domain/>", "<cookie/>", b"QEVM", pad=16)
    with pytest.raises(template.TemplateError, match="does not fit"):
        template.copy_save(tmp_path / "t.save", tmp_path / "j.save", "<domain>" + "x" * 64 +
                           "</domain>")


def test_a_file_that_is_not_a_save_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.save").write_bytes(b"QEVM" + bytes(200))
    with pytest.raises(template.TemplateError, match="not an uncompressed libvirt save"):
        template.copy_save(tmp_path / "t.save", tmp_path / "j.save", "<domain/>")


# --------------------------------------------------------------------------- the job port


def test_job_input_is_a_header_line_then_the_jobs_archive() -> None:
    spec = JobSpec(job_id="j1", argv=("echo", "a b"), env={"X": "1"}, cpus=2, memory_mib=512)
    seed = bytes(range(64))
    data = template.job_input(spec, 1_700_000_000_123_456_789, seed)
    line, body = data.split(b"\n", 1)
    magic, version, size, sec, nsec, hexseed = line.decode().split(" ")
    assert (magic, version) == ("VMJOB-JOB", "1")
    assert int(size) == len(body)
    assert (sec, nsec) == ("1700000000", "123456789")
    assert bytes.fromhex(hexseed) == seed and len(hexseed) == 128
    archive = gzip.decompress(body)
    for name, content in ((b"vmjob/argv/1", b"a b"), (b"vmjob/env/VMJOB_ID", b"j1"),
                          (b"vmjob/env/X", b"1")):
        assert name in archive and content in archive
    with pytest.raises(ValueError):
        template.job_input(spec, 0, b"short")
    assert isinstance(io.BytesIO(body).read(2), bytes)


# --------------------------------------------------------------------------- the setting


def test_start_is_cold_unless_asked() -> None:
    hosts = [{"name": "local", "uri": "qemu:///system"}]
    assert parse_config({"hosts": hosts}, "c.yaml").start == "cold"
    assert parse_config({"hosts": hosts, "start": "auto"}, "c.yaml").start == "auto"
    with pytest.raises(ConfigError, match="start"):
        parse_config({"hosts": hosts, "start": "hot"}, "c.yaml")
