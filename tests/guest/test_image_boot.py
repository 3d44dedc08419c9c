"""The guest image boots under the real libvirtd and speaks the guest protocol.

The image is built into a fresh spool per session (a real build, every time); the downloaded
.deb files are shared through the persistent test spool's cache so they are fetched once.
The domain here is a minimal one built in the test, independent of vmjobs.virt.domain_xml.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from vmjobs import guest_protocol, image
from vmjobs.image import Image, build_image

pytestmark = pytest.mark.guest

URI = "qemu:///system"
PERSISTENT = Path(os.environ.get("VMJOBS_TEST_SPOOL", "/var/tmp/vmjobs-test-spool"))
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"


@dataclass(frozen=True)
class Built:
    spool: Path
    image: Image
    seconds: float
    messages: list[str]


def _fresh_spool() -> Path:
    # Not pytest's tmp_path: that is private to root (0700) and QEMU runs as libvirt-qemu,
    # which must reach the kernel, initrd, disk and console below the spool.
    PERSISTENT.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix="image-test-", dir=PERSISTENT))
    os.chmod(spool, 0o755)
    (PERSISTENT / "cache").mkdir(exist_ok=True)
    (spool / "cache").symlink_to(PERSISTENT / "cache")
    return spool


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    spool = _fresh_spool()
    messages: list[str] = []
    started = time.monotonic()
    img, was_built = build_image(spool, progress=messages.append)
    seconds = time.monotonic() - started
    assert was_built
    print(f"\nimage build {seconds:.1f}s (debs cached: "
          f"{not any(m.startswith('downloading') for m in messages)}), "
          f"{img.size_bytes / 2**20:.1f} MiB")
    try:
        yield Built(spool, img, seconds, messages)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def domain_xml(name: str, kernel: Path, initrd: Path, disk: Path, console: Path) -> str:
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(initrd)
    ET.SubElement(os_el, "cmdline").text = CMDLINE
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        # panic=-1 reboots on a panic; on_reboot=destroy turns that into a stop, not a loop.
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="raw")
    ET.SubElement(disk_el, "source", file=str(disk))
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class Boot:
    console: str
    first_line_s: float | None
    total_s: float
    result: guest_protocol.GuestResult
    out: Path


def boot_job(img: Image, workdir: Path, spec: guest_protocol.JobSpec, first: str,
             disk_bytes: int = 16 << 20) -> Boot:
    workdir.mkdir(mode=0o755)
    initrd, disk = workdir / "initrd", workdir / "output.raw"
    console = workdir / "console.log"
    guest_protocol.write_job_initrd(spec, img.initrd, initrd)
    guest_protocol.create_output_disk(disk, disk_bytes)
    conn = libvirt.open(URI)
    dom = None
    try:
        dom = conn.defineXML(domain_xml(f"vmjob-imgtest-{spec.job_id}", img.kernel, initrd,
                                        disk, console))
        started = time.monotonic()
        dom.create()
        first_line = None
        deadline = started + 60
        while dom.isActive() and time.monotonic() < deadline:
            if first_line is None and console.exists() and first in console.read_text("utf-8",
                                                                                    "replace"):
                first_line = time.monotonic() - started
            time.sleep(0.02)
        total = time.monotonic() - started
        assert not dom.isActive(), "the guest did not power off within 60 s"
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            finally:
                dom.undefine()
        conn.close()
    text = console.read_text("utf-8", "replace")
    result = guest_protocol.read_output(disk, workdir / "out")
    return Boot(text, first_line, total, result, workdir / "out")


def test_guest_runs_job_and_reports(built: Built, tmp_path: Path) -> None:
    spec = guest_protocol.JobSpec(
        job_id=secrets.token_hex(4),
        argv=("sh", "-c", 'echo hello; mkdir -p out/d; echo data > "out/d/a b.txt"; exit 3'),
        env={}, cpus=1, memory_mib=256,
    )
    boot = boot_job(built.image, built.spool / "jobs-a", spec, "hello")
    print(f"\nfirst line after {boot.first_line_s:.2f}s, guest stopped after {boot.total_s:.2f}s")
    parsed = guest_protocol.job_lines(boot.console, spec.job_id)
    assert parsed.lines == ["hello"], boot.console
    assert parsed.exit_code == 3
    assert boot.result == guest_protocol.GuestResult(3, "ok", 1, 5)
    assert (boot.out / "d" / "a b.txt").read_text() == "data\n"


def test_guest_environment_argv_and_input(built: Built, tmp_path: Path) -> None:
    inp = tmp_path / "input"  # read by vmjobs, not by QEMU: a private directory is fine
    (inp / "sub dir").mkdir(parents=True)
    (inp / "sub dir" / "a b.txt").write_text("spaces survive\n")
    script = inp / "run.sh"
    script.write_text('#!/bin/sh\necho "script: $#: $1|$2"\n')
    script.chmod(0o755)
    spec = guest_protocol.JobSpec(
        job_id=secrets.token_hex(4),
        argv=("sh", "-c", 'printf "%s|" "$@"; echo; cat "sub dir/a b.txt"; '
              './run.sh "two words" \'$HOME\'; echo "$VMJOB_CPUS $VMJOB_MEM [$GREETING]";'
              ' printf "%s" "$TRAIL" | od -c | head -1; pwd; printf "no newline"',
              "x", "a  b", "", "$(reboot)", "*"),
        env={"GREETING": "hi there; $(id)", "TRAIL": "x\n\n"},
        cpus=1, memory_mib=256, input_dir=inp,
    )
    boot = boot_job(built.image, built.spool / "jobs-b", spec, "|")
    parsed = guest_protocol.job_lines(boot.console, spec.job_id)
    assert parsed.lines == [
        "a  b||$(reboot)|*|",
        "spaces survive",
        "script: 2: two words|$HOME",
        "1 256 [hi there; $(id)]",
        "0000000   x  \\n  \\n",
        "/job",
        "no newline",
    ], boot.console
    assert parsed.exit_code == 0
    assert boot.result.exit_code == 0 and boot.result.status == "ok"


def test_output_larger_than_the_disk_is_reported_as_overflow(built: Built) -> None:
    spec = guest_protocol.JobSpec(
        job_id=secrets.token_hex(4),
        argv=("sh", "-c", "head -c 3000000 /dev/zero > out/big; echo wrote; exit 5"),
        env={}, cpus=1, memory_mib=256,
    )
    boot = boot_job(built.image, built.spool / "jobs-c", spec, "wrote", disk_bytes=1 << 20)
    # the init reports what it needed (the tar of 3,000,000 bytes) and what the disk holds
    needed = boot.result.needed
    assert needed is not None and 3000000 < needed < 3010000
    assert boot.result == guest_protocol.GuestResult(5, "overflow", 0, 0, needed,
                                                     (1 << 20) - 512)
    assert not boot.out.exists()
    parsed = guest_protocol.job_lines(boot.console, spec.job_id)
    assert parsed.lines == ["wrote"] and parsed.exit_code == 5
    assert any("output disk holds" in note for note in parsed.notes), parsed.notes


def test_unknown_command_exits_127(built: Built) -> None:
    spec = guest_protocol.JobSpec(job_id=secrets.token_hex(4), argv=("no-such-command",),
                                  env={}, cpus=1, memory_mib=256)
    boot = boot_job(built.image, built.spool / "jobs-d", spec, "no-such-command")
    assert boot.result.exit_code == 127 and boot.result.status == "ok"
    assert "not found" in " ".join(guest_protocol.job_lines(boot.console, spec.job_id).lines)


def test_build_with_kernel_option_boots(built: Built, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The cloud kernel unpacked as if it were the host's: /boot/vmlinuz-* + /lib/modules.
    _, kdeb = image.resolve_debs(with_kernel=True)
    assert kdeb is not None
    host = tmp_path / "host"
    image.unpack_deb(PERSISTENT / "cache" / kdeb.filename, host)
    monkeypatch.setattr(image, "MODULES_ROOT", host / "lib" / "modules")
    [kernel] = (host / "boot").glob("vmlinuz-*")
    img, was_built = build_image(built.spool, kernel=kernel, name="hostkernel")
    assert was_built and img.id != built.image.id
    assert img.kernel_version == built.image.kernel_version
    assert image.resolve_image(built.spool, "default").id == built.image.id
    spec = guest_protocol.JobSpec(job_id=secrets.token_hex(4), argv=("uname", "-r"), env={},
                                  cpus=1, memory_mib=256)
    boot = boot_job(img, built.spool / "jobs-e", spec, img.kernel_version)
    assert guest_protocol.job_lines(boot.console, spec.job_id).lines == [img.kernel_version]
    assert boot.result.exit_code == 0


def test_second_build_is_a_noop(built: Built) -> None:
    before = sorted(p.name for p in (built.spool / "images").iterdir())
    messages: list[str] = []
    started = time.monotonic()
    again, was_built = build_image(built.spool, progress=messages.append)
    seconds = time.monotonic() - started
    print(f"\nno-op rebuild {seconds:.1f}s (cold build {built.seconds:.1f}s)")
    assert not was_built
    assert again == built.image
    assert sorted(p.name for p in (built.spool / "images").iterdir()) == before
    assert not any(m.startswith(("downloading", "unpacking", "writing")) for m in messages)


def test_rebuild_elsewhere_gives_identical_bytes(built: Built) -> None:
    spool = _fresh_spool()
    try:
        again, was_built = build_image(spool)
        assert was_built and again.id == built.image.id
        assert again.initrd.read_bytes() == built.image.initrd.read_bytes()
        assert again.kernel.read_bytes() == built.image.kernel.read_bytes()
    finally:
        shutil.rmtree(spool)


def test_image_contents_unpack_with_cpio(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = subprocess.run(["gzip", "-dc", str(built.image.initrd)], check=True,
                          capture_output=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=root, check=True)
    order = (root / "lib/modules/load-order").read_text().split()
    assert order.index("virtio.ko") < order.index("virtio_pci.ko") < order.index("virtio_blk.ko")
    assert {"virtio_blk.ko", "virtio_console.ko"} <= set(order)
    # the NIC driver is loaded only for jobs with NICs
    assert "virtio_net.ko" in (root / "lib/modules/load-order.nic").read_text().split()
    assert "virtio_net.ko" not in order
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert (root / "init").read_bytes() == image.recipe_bytes("init")
    assert (root / "init").stat().st_mode & 0o111
