"""Image building without network or a real kernel: fake bzImage, fake modules, a fake
busybox-static .deb. The real build and boot are in tests/guest/test_image_boot.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmjobs import image
from vmjobs.cli.image import image_dict
from vmjobs.errors import NotFound, UsageError, VmjobsError

VERSION = "6.1.0-99-test-amd64"


def fake_module(depends: str, name: str) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, as modinfo() reads it."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_at = 64
    modinfo_at = data_at + len(shstrtab)
    shoff = modinfo_at + len(modinfo)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, modinfo_at, len(modinfo), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, data_at, len(shstrtab), 0, 0, 1, 0)
    return head + shstrtab + modinfo + sections


def fake_bzimage(version: str, size: int = 8192) -> bytes:
    data = bytearray(size)
    data[0x202:0x206] = b"HdrS"
    text = f"{version} (test@example) #1 SMP".encode() + b"\0"
    struct.pack_into("<H", data, 0x20E, 0x1000 - 0x200)
    data[0x1000:0x1000 + len(text)] = text
    return bytes(data)


def fake_elf_kernel(note_type: int = image.ELF_NOTE_PVH_ENTRY) -> bytes:
    """An ELF64 executable with one PT_NOTE segment holding a "Xen" note of `note_type`."""
    note = struct.pack("<III", 4, 8, note_type) + b"Xen\0" + struct.pack("<Q", 0x1000850)
    phoff, notes_at = 64, 64 + 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0, 64, 56, 1,
                               64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(note), len(note), 4)
    return head + phdr + note + b"kernel text" * 50


def fake_bzimage_with(elf: bytes, version: str = VERSION) -> bytes:
    """fake_bzimage with a gzip payload as the kernel's build makes it: boot protocol 2.15,
    the payload after the setup sectors, its last 4 bytes the uncompressed size."""
    data = bytearray(fake_bzimage(version))
    setup_sectors = len(data) // 512 - 1
    payload = gzip.compress(elf, mtime=0) + struct.pack("<I", len(elf))
    data[0x1F1] = setup_sectors
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<II", data, 0x248, 0, len(payload))
    return bytes(data) + payload


# name -> (depends, file under kernel/, compressed)
MODULES = {
    "virtio_ring": ("", "drivers/virtio/virtio_ring.ko.xz"),
    "virtio_pci_modern_dev": ("", "drivers/virtio/virtio_pci_modern_dev.ko"),
    "virtio_pci": ("virtio_pci_modern_dev,virtio_ring,virtio", "drivers/virtio/virtio_pci.ko"),
    "virtio_blk": ("virtio_ring,virtio", "drivers/block/virtio_blk.ko"),
    "failover": ("", "net/core/failover.ko"),
    "net_failover": ("failover", "drivers/net/net_failover.ko"),
    "virtio_net": ("net_failover,virtio_ring,virtio", "drivers/net/virtio_net.ko"),
    "virtio_console": ("virtio_ring,virtio", "drivers/char/virtio_console.ko"),
    "virtio_mem": ("virtio_ring,virtio", "drivers/virtio/virtio_mem.ko"),
    "virtio_balloon": ("virtio_ring,virtio", "drivers/virtio/virtio_balloon.ko"),
    "unrelated": ("", "fs/unrelated.ko"),
}


def make_module_tree(root: Path, version: str = VERSION) -> Path:
    moddir = root / version
    for name, (depends, rel) in MODULES.items():
        path = moddir / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        elf = fake_module(depends, name)
        path.write_bytes(lzma.compress(elf) if rel.endswith(".xz") else elf)
    # virtio itself is built in, as CONFIG_VIRTIO=y would make it.
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return moddir


def make_busybox_deb(tmp: Path) -> Path:
    root = tmp / "bbroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: busybox-static\nVersion: 1:1.0-test\nArchitecture: amd64\n"
        "Maintainer: test <test@example>\nDescription: fake busybox for tests\n")
    (root / "bin").mkdir()
    busybox = root / "bin" / "busybox"
    # Answers --list-full like the real one; enough for the build to create applet links.
    busybox.write_text("#!/bin/sh\nprintf '/bin/sh\\n/sbin/poweroff\\n/usr/bin/tar\\n"
                       "/sbin/init\\n/bin/busybox\\n'\n")
    busybox.chmod(0o755)
    deb = tmp / "busybox-static_1.0-test_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


@dataclass
class Fakes:
    spool: Path
    kernel: Path
    moddir: Path
    deb: image.Deb


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(fake_bzimage(VERSION))
    moddir = make_module_tree(tmp_path / "modules")
    monkeypatch.setattr(image, "MODULES_ROOT", tmp_path / "modules")
    deb_path = make_busybox_deb(tmp_path)
    sha = hashlib.sha256(deb_path.read_bytes()).hexdigest()
    deb = image.Deb("busybox-static", "1:1.0-test", sha, deb_path.stat().st_size, deb_path.name)
    spool = tmp_path / "spool"
    (spool / "cache").mkdir(parents=True)
    os.link(deb_path, spool / "cache" / deb.filename)  # as if downloaded before

    def no_apt(with_kernel: bool) -> tuple[image.Deb, image.Deb | None]:
        assert not with_kernel
        return deb, None

    monkeypatch.setattr(image, "resolve_debs", no_apt)
    yield Fakes(spool, kernel, moddir, deb)


def unpack_initrd(path: Path, into: Path) -> None:
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=gzip.decompress(path.read_bytes()),
                   cwd=into, check=True)


def test_bzimage_version_from_header(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(fake_bzimage("6.1.0-56-cloud-amd64"))
    assert image.bzimage_version(kernel) == "6.1.0-56-cloud-amd64"
    kernel.write_bytes(b"MZ not a kernel" * 100)
    with pytest.raises(VmjobsError, match="not an x86 bzImage"):
        image.bzimage_version(kernel)


def test_modinfo_reads_depends() -> None:
    info = image.modinfo(fake_module("a,b", "c"), "c.ko")
    assert info["depends"] == ["a,b"] and info["name"] == ["c"]
    with pytest.raises(VmjobsError, match="not a 64-bit"):
        image.modinfo(b"\x7fELF\x01" + bytes(100), "x.ko")


def test_modules_resolve_dependencies_first_and_skip_builtins(tmp_path: Path) -> None:
    moddir = make_module_tree(tmp_path)
    mods = image.resolve_modules(moddir, ["virtio_pci", "virtio_blk", "virtio_net",
                                          "virtio_console"])
    names = [m.name for m in mods]
    assert names == ["virtio_pci_modern_dev", "virtio_ring", "virtio_pci", "virtio_blk",
                     "failover", "net_failover", "virtio_net", "virtio_console"]
    assert "virtio" not in names  # built in
    ring = mods[names.index("virtio_ring")]
    assert ring.path.name.endswith(".ko.xz") and ring.elf.startswith(b"\x7fELF")


def test_missing_module_names_who_needs_it(tmp_path: Path) -> None:
    moddir = make_module_tree(tmp_path)
    (moddir / "kernel/net/core/failover.ko").unlink()
    with pytest.raises(VmjobsError, match="module failover \\(needed by net_failover\\)"):
        image.resolve_modules(moddir, ["virtio_net"])


def test_recipe_is_read_from_the_package() -> None:
    assert image.recipe_bytes("init").startswith(b"#!/bin/sh")
    assert image.wanted_modules() == {"": ["virtio_pci", "virtio_blk", "virtio_console",
                                           "virtio_mem", "virtio_balloon"],
                                      "nic": ["virtio_net"]}


def test_vmlinux_is_extracted_when_it_has_a_pvh_entry(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    elf = fake_elf_kernel()
    kernel.write_bytes(fake_bzimage_with(elf))
    assert image.extract_vmlinux(kernel) == (elf, "")
    kernel.write_bytes(fake_bzimage_with(fake_elf_kernel(note_type=17)))
    assert image.extract_vmlinux(kernel) == \
        (None, "the kernel has no PVH entry (CONFIG_PVH is off)")
    kernel.write_bytes(fake_bzimage(VERSION))  # boot protocol 0: no payload fields
    got, why = image.extract_vmlinux(kernel)
    assert got is None and "no payload fields" in why
    broken = bytearray(fake_bzimage_with(elf))
    struct.pack_into("<I", broken, len(broken) - 4, len(elf) + 1)  # announces a wrong size
    kernel.write_bytes(bytes(broken))
    got, why = image.extract_vmlinux(kernel)
    assert got is None and "did not give" in why


def test_build_boots_vmlinux_with_qboot(fakes: Fakes, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rom = tmp_path / "qboot.rom"
    rom.write_bytes(b"\x55\xaa rom" * 100)
    monkeypatch.setattr(image, "QBOOT_ROM", rom)
    elf = fake_elf_kernel()
    fakes.kernel.write_bytes(fake_bzimage_with(elf))
    img, _ = image.build_image(fakes.spool, kernel=fakes.kernel)
    assert img.vmlinux is not None and img.vmlinux.read_bytes() == elf
    assert img.boot_kernel == img.vmlinux
    assert img.firmware is not None and img.firmware.read_bytes() == rom.read_bytes()
    manifest = json.loads((img.initrd.parent / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vmlinuz", "vmlinux", "initrd", "qboot.rom"}
    listed = image_dict(img)  # `vmjob image list --json`
    assert (listed["boot_kernel"], listed["firmware"]) == (str(img.vmlinux), str(img.firmware))
    rom.write_bytes(b"another rom")  # the firmware is an input: a new one makes a new image
    assert image.build_image(fakes.spool, kernel=fakes.kernel)[0].id != img.id


def test_build_falls_back_to_bzimage_and_default_firmware(
        fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "QBOOT_ROM", tmp_path / "absent.rom")
    messages: list[str] = []
    img, _ = image.build_image(fakes.spool, kernel=fakes.kernel, progress=messages.append)
    assert img.vmlinux is None and img.firmware is None and img.boot_kernel == img.kernel
    assert (image_dict(img)["boot_kernel"], image_dict(img)["firmware"]) == (str(img.kernel), None)
    assert any("booting the compressed kernel" in m for m in messages)
    assert any("default firmware" in m for m in messages)


def test_build_with_kernel_then_noop(fakes: Fakes, tmp_path: Path) -> None:
    messages: list[str] = []
    img, built = image.build_image(fakes.spool, kernel=fakes.kernel, progress=messages.append)
    assert built and img.name == "default" and img.kernel_version == VERSION
    assert len(img.id) == image.ID_LENGTH
    home = fakes.spool / "images" / img.id
    assert img.kernel == home / "vmlinuz" and img.initrd == home / "initrd"
    assert img.kernel.read_bytes() == fakes.kernel.read_bytes()
    assert img.size_bytes == sum(p.stat().st_size for p in home.iterdir()
                                 if p.name != "manifest.json")
    assert any(m.startswith("packing 7 modules") and "for jobs with NICs 3:" in m
               for m in messages)
    for path in (home / "vmlinuz", home / "initrd", home / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # QEMU runs as another user
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    manifest = json.loads((home / "manifest.json").read_text())
    assert manifest["id"] == img.id and manifest["kernel_version"] == VERSION
    assert manifest["inputs"]["busybox_deb"]["sha256"] == fakes.deb.sha256
    assert manifest["files"]["initrd"]["sha256"] == \
        hashlib.sha256(img.initrd.read_bytes()).hexdigest()
    assert (fakes.spool / "images" / "tags" / "default").read_text() == f"{img.id}\n"

    mtime = img.initrd.stat().st_mtime_ns
    messages.clear()
    again, built = image.build_image(fakes.spool, kernel=fakes.kernel, progress=messages.append)
    assert not built and again == img
    assert img.initrd.stat().st_mtime_ns == mtime
    assert not any(m.startswith(("unpacking", "writing", "packing")) for m in messages)
    assert sorted(p.name for p in (fakes.spool / "images").iterdir()) == [img.id, "tags"]


def test_initrd_layout(fakes: Fakes, tmp_path: Path) -> None:
    img, _ = image.build_image(fakes.spool, kernel=fakes.kernel)
    root = tmp_path / "root"
    unpack_initrd(img.initrd, root)
    assert (root / "init").read_bytes() == image.recipe_bytes("init")
    assert stat.S_IMODE((root / "init").stat().st_mode) == 0o755
    assert stat.S_ISCHR((root / "dev/console").lstat().st_mode)
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.readlink(root / "usr/bin/tar") == "/bin/busybox"
    assert not (root / "bin/busybox").is_symlink()
    order = (root / "lib/modules/load-order").read_text().split()
    assert order == ["virtio_pci_modern_dev.ko", "virtio_ring.ko", "virtio_pci.ko",
                     "virtio_blk.ko", "virtio_console.ko", "virtio_mem.ko",
                     "virtio_balloon.ko"]
    # loaded only by a job with NICs, after the others (their shared dependencies already are)
    assert (root / "lib/modules/load-order.nic").read_text().split() == \
        ["failover.ko", "net_failover.ko", "virtio_net.ko"]
    assert (root / "lib/modules/virtio_net.ko").read_bytes().startswith(b"\x7fELF")
    # Stored decompressed: busybox insmod need not understand xz or zstd.
    assert (root / "lib/modules/virtio_ring.ko").read_bytes().startswith(b"\x7fELF")
    assert "root:x:0:0" in (root / "etc/passwd").read_text()
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777


def test_same_inputs_same_bytes_other_spool(fakes: Fakes) -> None:
    first, _ = image.build_image(fakes.spool, kernel=fakes.kernel)
    other = fakes.spool.parent / "other-spool"
    (other / "cache").mkdir(parents=True)
    os.link(fakes.spool / "cache" / fakes.deb.filename, other / "cache" / fakes.deb.filename)
    second, built = image.build_image(other, kernel=fakes.kernel)
    assert built and second.id == first.id
    assert second.initrd.read_bytes() == first.initrd.read_bytes()


def test_changed_input_changes_the_id(fakes: Fakes) -> None:
    first, _ = image.build_image(fakes.spool, kernel=fakes.kernel)
    (fakes.moddir / "kernel/drivers/block/virtio_blk.ko").write_bytes(
        fake_module("virtio_ring,virtio", "virtio_blk") + b"\0")
    second, built = image.build_image(fakes.spool, kernel=fakes.kernel)
    assert built and second.id != first.id
    assert image.resolve_image(fakes.spool, "default").id == second.id


def test_interrupted_build_leaves_nothing(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(image, "write_gzip_newc", interrupt)
    with pytest.raises(KeyboardInterrupt):
        image.build_image(fakes.spool, kernel=fakes.kernel)
    assert [p.name for p in (fakes.spool / "images").iterdir()] == ["tags"]
    assert list((fakes.spool / "images" / "tags").iterdir()) == []
    assert image.list_images(fakes.spool) == []


def test_list_and_resolve(fakes: Fakes) -> None:
    with pytest.raises(NotFound, match="no images yet; run 'vmjob image build'"):
        image.resolve_image(fakes.spool, "default")
    img, _ = image.build_image(fakes.spool, kernel=fakes.kernel)
    image.build_image(fakes.spool, kernel=fakes.kernel, name="host")
    assert [(i.name, i.id) for i in image.list_images(fakes.spool)] == \
        [("default", img.id), ("host", img.id)]
    assert image.resolve_image(fakes.spool, "host").name == "host"
    assert image.resolve_image(fakes.spool, img.id[:6]).id == img.id
    with pytest.raises(NotFound) as info:
        image.resolve_image(fakes.spool, "nope")
    assert str(info.value) == "unknown image 'nope' (known: default, host)"


@pytest.mark.parametrize("name", ["a/b", "../x", "", ".hidden", "x" * 65])
def test_bad_names_are_refused(fakes: Fakes, name: str) -> None:
    with pytest.raises(UsageError, match="bad image name"):  # exit 2: a bad --name
        image.build_image(fakes.spool, kernel=fakes.kernel, name=name)


def test_kernel_without_modules_says_where_it_looked(fakes: Fakes, tmp_path: Path) -> None:
    other = tmp_path / "other-kernel"
    other.write_bytes(fake_bzimage("5.10.0-1-other"))
    with pytest.raises(VmjobsError) as info:
        image.build_image(fakes.spool, kernel=other)
    assert str(info.value).startswith("no modules for kernel 5.10.0-1-other: looked in ")
    assert str(fakes.moddir.parent / "5.10.0-1-other") in str(info.value)
    with pytest.raises(UsageError, match="no such file"):  # exit 2: a bad --kernel
        image.build_image(fakes.spool, kernel=tmp_path / "missing")


# ---------------------------------------------------------------- apt, without the network

POLICY = """busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
linux-image-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
"""
SHOW_META = """Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Size: 928188
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
SHA256: {bb}

Package: linux-image-cloud-amd64
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
SHA256: {meta}
"""
SHOW_KERNEL = """Package: linux-image-6.1.0-56-cloud-amd64
Version: 6.1.192-2
Depends: kmod, linux-base (>= 4.3~)
Size: 26713492
Filename: pool/l/linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb
SHA256: {k}
"""


def fake_apt(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str],
             downloads: dict[str, bytes] | None = None) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], what: str, cwd: Path | None = None) -> str:
        calls.append(argv)
        if argv[:2] == ["apt-get", "download"]:
            assert cwd is not None and downloads is not None
            package = argv[-1].split("=")[0]
            (cwd / f"{package}_x_amd64.deb").write_bytes(downloads[package])
            return ""
        key = " ".join(argv[:2]) + (" kernel" if "linux-image-6" in " ".join(argv) else "")
        return answers[key]

    monkeypatch.setattr(image, "_run", run)
    return calls


def test_resolve_debs_follows_the_meta_package(monkeypatch: pytest.MonkeyPatch) -> None:
    bb, meta, k = "b" * 64, "c" * 64, "d" * 64
    calls = fake_apt(monkeypatch, {
        "apt-cache policy": POLICY,
        "apt-cache show": SHOW_META.format(bb=bb, meta=meta),
        "apt-cache show kernel": SHOW_KERNEL.format(k=k),
    })
    busybox, kernel = image.resolve_debs(with_kernel=True)
    assert busybox == image.Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", bb, 928188,
                                "busybox-static_1.35.0-4+deb12u1+b1_amd64.deb")
    assert kernel is not None
    assert (kernel.package, kernel.version, kernel.sha256) == \
        ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", k)
    assert kernel.filename == "linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb"
    assert len(calls) == 3  # apt-cache is slow where it keeps no cache: ask in batches


def test_no_candidate_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt(monkeypatch, {"apt-cache policy": POLICY.replace("Candidate: 6.1.192-2",
                                                              "Candidate: (none)")})
    with pytest.raises(VmjobsError, match="no installable version of linux-image-cloud-amd64"):
        image.resolve_debs(with_kernel=True)


def test_record_without_sha256_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt(monkeypatch, {"apt-cache policy": POLICY,
                           "apt-cache show": SHOW_META.format(bb="", meta="c" * 64)})
    with pytest.raises(VmjobsError, match="no SHA256 for busybox-static"):
        image.resolve_debs(with_kernel=True)


def test_download_is_checked_against_apt(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    good = b"the real package"
    deb = image.Deb("pkg", "1.0", hashlib.sha256(good).hexdigest(), len(good), "pkg_1.0.deb")
    cache = tmp_path / "cache"
    cache.mkdir()
    fake_apt(monkeypatch, {}, {"pkg": b"tampered package"})
    with pytest.raises(VmjobsError, match="does not match apt's"):
        image.fetch_deb(deb, cache, lambda _: None)
    assert list(cache.iterdir()) == []

    calls = fake_apt(monkeypatch, {}, {"pkg": good})
    assert image.fetch_deb(deb, cache, lambda _: None).read_bytes() == good
    assert image.fetch_deb(deb, cache, lambda _: None).read_bytes() == good
    assert len(calls) == 1  # the second time it came from the cache
    assert [p.name for p in cache.iterdir()] == ["pkg_1.0.deb"]
