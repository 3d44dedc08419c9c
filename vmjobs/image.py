"""The guest image: a kernel plus a base initramfs (busybox, our init, the virtio modules).

For a faster cold start an image also carries, when it can, the kernel uncompressed
(`vmlinux`, booted through its PVH entry: no decompression in the guest) and the qboot
firmware (`qboot.rom`, from QEMU's own package: far less to run than SeaBIOS); a guest boots
the bzImage with QEMU's default firmware when either is missing. See docs/image.md.

Images live in `<spool>/images/<id>/` where the id is a hash of every input (the checked .deb
files or kernel and module bytes, busybox, the init and module list, the recipe version), so a
build whose inputs are unchanged finds its image and does nothing. Tags (`<spool>/images/tags/
<name>`) map names such as "default" to ids. Downloaded packages are kept in `<spool>/cache/`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vmjobs.cpio import Entry, write_gzip_newc
from vmjobs.errors import NotFound, UsageError, VmjobsError

# Bump whenever the build changes what it produces from the same inputs.
# 2: vmlinux and qboot.rom beside vmlinuz; NIC modules in their own load list.
RECIPE_VERSION = 2
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
ID_LENGTH = 16
MODULES_ROOT = Path("/lib/modules")  # where --kernel's modules are looked for
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# SeaBIOS's small replacement, shipped by Debian's qemu-system-data; copied into the image so
# that every host boots the same bytes from the shared spool (a migration needs the same ROM).
QBOOT_ROM = Path("/usr/share/qemu/qboot.rom")
# The group of modules.txt lines loaded only for jobs with NICs (images/init).
NIC_GROUP = "nic"

# Small files every guest gets; tools such as `id` and `whoami` look for them.
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Image:
    id: str
    name: str  # the tag it was resolved or listed by; "" for an untagged image
    kernel: Path
    initrd: Path
    kernel_version: str
    size_bytes: int
    vmlinux: Path | None = None  # the kernel uncompressed, bootable through PVH
    firmware: Path | None = None  # qboot; None: QEMU's default firmware (SeaBIOS)

    @property
    def boot_kernel(self) -> Path:
        """The kernel a guest boots: the uncompressed one when the image has it."""
        return self.vmlinux or self.kernel


@dataclass(frozen=True)
class Deb:
    """One exact package version as apt describes it, and the checksum its .deb must have."""

    package: str
    version: str
    sha256: str
    size: int
    filename: str  # the basename apt would give the .deb

    def describe(self) -> str:
        return f"{self.package} {self.version}"


# ---------------------------------------------------------------- commands and checksums


# apt's messages and `apt-cache policy`'s labels ("Candidate:") are translated: LANGUAGE=de
# gives "Installationskandidat:" even under LC_ALL=C.UTF-8 (gettext ignores LANGUAGE only in
# the C locale proper), so both are set for every command run here.
C_LOCALE = {"LC_ALL": "C.UTF-8", "LANGUAGE": ""}


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, **C_LOCALE})
    except FileNotFoundError:
        raise VmjobsError(f"{what}: {argv[0]} is not installed") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise VmjobsError(f"{what} failed: {why}")
    return done.stdout


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- Debian packages


# Each apt-cache run costs up to a second where apt keeps no binary cache (containers), so
# questions are asked in batches: the no-op rebuild is mostly this.


def apt_candidates(packages: list[str]) -> dict[str, str]:
    """The version `apt-get install` would pick for each package."""
    out = _run(["apt-cache", "policy", *packages], "apt-cache policy")
    found: dict[str, str] = {}
    package = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1]
        elif package and line.strip().startswith("Candidate:"):
            found[package] = line.split(":", 1)[1].strip()
    for package in packages:
        if found.get(package, "(none)") == "(none)":
            raise VmjobsError(f"apt knows no installable version of {package} "
                              "(is it in the sources? try 'apt-get update')")
    return found


def apt_records(wanted: dict[str, str]) -> dict[str, dict[str, str]]:
    """apt's record of each exact package=version (Depends, SHA256, Size, Filename...)."""
    out = _run(["apt-cache", "show", *(f"{p}={v}" for p, v in wanted.items())],
               "apt-cache show")
    records: dict[str, dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        record: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line[:1].isspace():
                record[key] = value.strip()
        package = record.get("Package", "")
        # The same version may be listed by several sources; the first record is apt's pick.
        if wanted.get(package) == record.get("Version") and package not in records:
            records[package] = record
    return records


def _deb(package: str, version: str, record: dict[str, str] | None) -> Deb:
    sha = (record or {}).get("SHA256", "")
    if record is None or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise VmjobsError(f"apt has no SHA256 for {package} {version}; refusing to use it "
                          "unchecked")
    return Deb(package, version, sha, int(record.get("Size", "0") or 0),
               Path(record.get("Filename", f"{package}_{version}.deb")).name)


def resolve_debs(with_kernel: bool) -> tuple[Deb, Deb | None]:
    """The busybox-static .deb and, if asked, the linux-image-<abi>-cloud-amd64 .deb that
    linux-image-cloud-amd64 currently depends on."""
    packages = [BUSYBOX_PACKAGE] + ([KERNEL_META_PACKAGE] if with_kernel else [])
    versions = apt_candidates(packages)
    records = apt_records(versions)
    busybox = _deb(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE], records.get(BUSYBOX_PACKAGE))
    if not with_kernel:
        return busybox, None
    depends = records.get(KERNEL_META_PACKAGE, {}).get("Depends", "")
    match = re.search(r"(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)", depends)
    if not match:
        raise VmjobsError(f"cannot find the kernel package {KERNEL_META_PACKAGE} depends on "
                          f"(Depends: {depends or 'none'})")
    package, version = match.groups()
    return busybox, _deb(package, version, apt_records({package: version}).get(package))


# What apt's answers depend on: its package lists, its configuration, dpkg's status. While
# none of these files changed (name, size, mtime), apt would answer as it did last time.
APT_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/status"))


def apt_fingerprint(roots: tuple[Path, ...] = APT_STATE) -> str:
    """A hash of (path, size, mtime) of every file under `roots` (a few hundred stats, no
    reads): it changes with every `apt-get update`, sources or pin change, install."""
    entries = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # removed meanwhile (apt-get update): the next stat differs anyway
            entries.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
    return sha256_bytes("\n".join(entries).encode())


def resolve_debs_cached(spool: Path, with_kernel: bool,
                        fingerprint: Callable[[], str] = apt_fingerprint) -> tuple[Deb, Deb | None]:
    """`resolve_debs`, remembered in `<spool>/cache/apt-resolved.json` (with the downloaded
    .debs) under apt's fingerprint: a rebuild while apt's state is unchanged runs no apt
    command at all."""
    path = spool / "cache" / "apt-resolved.json"
    now = fingerprint()
    key = "with_kernel" if with_kernel else "busybox_only"
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == now and key in saved:
            busybox, kernel = saved[key]
            return Deb(**busybox), Deb(**kernel) if kernel else None
    except (OSError, ValueError, TypeError, KeyError):
        saved = {}  # none yet, or unreadable: ask apt
    busybox, kernel = resolve_debs(with_kernel)
    if saved.get("fingerprint") != now:
        saved = {"fingerprint": now}
    saved[key] = [asdict(busybox), asdict(kernel) if kernel else None]
    _mkdirs(path.parent)
    _write_atomic(path, json.dumps(saved, indent=1).encode())
    return busybox, kernel


def fetch_deb(deb: Deb, cache: Path, progress: Progress) -> Path:
    """The checked .deb in the cache, downloaded with apt-get if not there yet."""
    path = cache / deb.filename
    if path.exists():
        if sha256_file(path) == deb.sha256:
            progress(f"using cached {deb.describe()}")
            return path
        path.unlink()  # a leftover that no longer matches what apt expects
    mib = f" ({deb.size / 2**20:.1f} MiB)" if deb.size else ""
    progress(f"downloading {deb.describe()}{mib}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        # apt-get download writes into its working directory; a private one means the only
        # .deb there is the one we asked for.
        _run(["apt-get", "download", "-q", f"{deb.package}={deb.version}"],
             f"apt-get download {deb.package}", cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise VmjobsError(f"apt-get download {deb.package} produced {len(debs)} .deb files")
        got = debs[0]
        actual = sha256_file(got)
        if actual != deb.sha256:
            raise VmjobsError(f"{got.name}: sha256 {actual} does not match apt's {deb.sha256}; "
                              "refusing it")
        os.chmod(got, 0o644)
        os.replace(got, path)
    return path


def unpack_deb(deb_path: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb_path), str(dest)], f"dpkg-deb -x {deb_path.name}")


# ---------------------------------------------------------------- kernel and modules


def bzimage_version(kernel: Path) -> str:
    """The release string (`uname -r`) that the x86 boot header of a bzImage points to."""
    try:
        with kernel.open("rb") as handle:
            head = handle.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                raise VmjobsError(f"{kernel} is not an x86 bzImage kernel (no boot header)")
            (offset,) = struct.unpack_from("<H", head, 0x20E)
            handle.seek(offset + 0x200)
            text = handle.read(256).split(b"\0")[0].decode("ascii", "replace")
    except OSError as exc:
        raise VmjobsError(f"cannot read kernel {kernel}: {exc.strerror}") from None
    version = text.split(" ")[0]
    if not version:
        raise VmjobsError(f"{kernel}: no version string in the boot header")
    return version


# Magic numbers of the compressed payload in a bzImage (scripts/extract-vmlinux).
_PAYLOADS = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
)
ELF_NOTE_PVH_ENTRY = 18  # XEN_ELFNOTE_PHYS32_ENTRY: the kernel's 32-bit PVH entry point


def extract_vmlinux(bzimage: Path) -> tuple[bytes | None, str]:
    """The uncompressed ELF kernel inside an x86 bzImage, if QEMU can boot it directly.

    Returns (ELF bytes, "") or (None, why not). QEMU boots an ELF kernel given to -kernel
    through its PVH entry, which the kernel has with CONFIG_PVH (it announces it with the ELF
    note XEN_ELFNOTE_PHYS32_ENTRY). The payload is found from the boot header (boot protocol
    >= 2.08: payload_offset at 0x248, payload_length at 0x24c, after the setup sectors; the
    last 4 bytes of the payload are the uncompressed size, Linux scripts/Makefile.lib
    size_append) and decompressed with the standard library (gzip, xz, lzma) or the `zstd`
    and `lz4` tools. Source: Documentation/x86/boot.rst, scripts/extract-vmlinux."""
    try:
        data = bzimage.read_bytes()
    except OSError as exc:
        return None, f"cannot read {bzimage}: {exc.strerror}"
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None, "not a bzImage"
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        return None, f"boot protocol {protocol:#x} has no payload fields"
    setup_sectors = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sectors + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        return None, "payload outside the file"
    (size,) = struct.unpack_from("<I", payload, payload_length - 4)
    compressed = payload[:-4]
    kind = next((name for magic, name in _PAYLOADS if compressed.startswith(magic)), None)
    if kind is None:
        return None, f"unknown kernel compression (magic {compressed[:4].hex()})"
    try:
        elf = _decompress(kind, compressed)
    except (OSError, ValueError, lzma.LZMAError, zlib.error, VmjobsError) as exc:
        return None, f"{kind} payload: {exc}"
    if len(elf) != size or elf[:4] != b"\x7fELF":
        return None, f"{kind} payload did not give the {size}-byte ELF kernel it announces"
    if not _has_note(elf, ELF_NOTE_PVH_ENTRY):
        return None, "the kernel has no PVH entry (CONFIG_PVH is off)"
    return elf, ""


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if kind in ("xz", "lzma"):
        form = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(form).decompress(data)
    tool = ["zstd", "-dcq"] if kind == "zstd" else ["lz4", "-dcq"]
    try:
        done = subprocess.run(tool, input=data, capture_output=True)
    except FileNotFoundError:
        raise VmjobsError(f"{tool[0]} is not installed") from None
    if done.returncode != 0:
        raise VmjobsError(f"{tool[0]} failed")
    return done.stdout


def _has_note(elf: bytes, note_type: int) -> bool:
    """Whether a 64-bit little-endian ELF file has a note of `note_type` in a PT_NOTE
    segment (System V ABI: Elf64_Phdr, Elf64_Nhdr with 4-byte aligned name and desc)."""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            return False
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, at)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = offset, min(offset + filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            if kind == note_type:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def module_name(path: str) -> str:
    """The kernel's name for a module file: `virtio-rng.ko.xz` -> `virtio_rng`."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when the distribution compressed it."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        try:
            done = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
        except FileNotFoundError:
            raise VmjobsError(f"{path} is zstd-compressed and zstd is not installed") from None
        if done.returncode != 0:
            raise VmjobsError(f"zstd could not decompress {path}")
        return done.stdout
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise VmjobsError(f"{path}: unknown module compression")


def modinfo(elf: bytes, where: str) -> dict[str, list[str]]:
    """The key=value strings of a module's `.modinfo` section (what `modinfo` prints)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise VmjobsError(f"{where} is not a 64-bit little-endian ELF module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf,
                                                                      shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = elf.index(b"\0", names_at + name_off)
        if elf[names_at + name_off:end] == b".modinfo":
            for item in elf[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class Module:
    name: str
    path: Path  # the file in the module tree, possibly compressed
    elf: bytes  # decompressed: busybox insmod need not know any compression


def _module_files(moddir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top, dirs, files in os.walk(moddir):
        dirs[:] = sorted(d for d in dirs if d not in ("build", "source"))
        for filename in sorted(files):
            if re.search(r"\.ko(\.xz|\.zst|\.gz)?$", filename):
                path = Path(top) / filename
                name = module_name(filename)
                # depmod's rule: a module under updates/ overrides the kernel's own.
                if name not in found or "updates" in path.relative_to(moddir).parts[:1]:
                    found[name] = path
    return found


def _builtin(moddir: Path) -> set[str]:
    builtin = moddir / "modules.builtin"
    if not builtin.exists():
        return set()
    return {module_name(line) for line in builtin.read_text().split() if line}


def resolve_modules(moddir: Path, wanted: list[str]) -> list[Module]:
    """`wanted` plus everything they depend on, dependencies first; built-ins are skipped.

    Dependencies come from each module's own `.modinfo` (`depends=`), which is what depmod
    turns into modules.dep; distribution packages ship without modules.dep, so reading the
    modules themselves works for both a .deb and a host's /lib/modules.
    """
    files = _module_files(moddir)
    builtin = _builtin(moddir)
    order: list[Module] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in chain:
            raise VmjobsError(f"module dependency loop: {' -> '.join((*chain, name))}")
        path = files.get(name)
        if path is None:
            needed = f" (needed by {chain[-1]})" if chain else ""
            raise VmjobsError(f"module {name}{needed} is neither built into the kernel nor "
                              f"found under {moddir}")
        elf = read_module(path)
        for dep in modinfo(elf, str(path)).get("depends", []):
            for dep_name in filter(None, dep.split(",")):
                visit(dep_name, (*chain, name))
        done.add(name)
        order.append(Module(name, path, elf))

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------- recipe and initramfs


def recipe_bytes(name: str) -> bytes:
    return resources.files("vmjobs.images").joinpath(name).read_bytes()


def wanted_modules() -> dict[str, list[str]]:
    """modules.txt: module names by group, "" (every guest) and NIC_GROUP (jobs with NICs:
    a line `name nic`)."""
    groups: dict[str, list[str]] = {"": [], NIC_GROUP: []}
    for line in recipe_bytes("modules.txt").decode().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        group = words[1] if len(words) > 1 else ""
        if len(words) > 2 or group not in groups:
            raise VmjobsError(f"modules.txt: bad line {line!r} (a name, then optionally "
                              f"'{NIC_GROUP}')")
        groups[group].append(words[0])
    return groups


def resolve_module_groups(moddir: Path) -> tuple[list[Module], list[Module]]:
    """(modules every guest loads, the further ones only a job with NICs loads), each in
    load order; a module both need is in the first list only."""
    groups = wanted_modules()
    base = resolve_modules(moddir, groups[""])
    loaded = {m.name for m in base}
    every = resolve_modules(moddir, groups[""] + groups[NIC_GROUP])
    return base, [m for m in every if m.name not in loaded]


def busybox_applets(busybox: Path) -> list[str]:
    """Where `busybox --install` would put each applet ("bin/sh", "usr/bin/awk", ...)."""
    out = _run([str(busybox), "--list-full"], "busybox --list-full")
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def initramfs_entries(busybox: Path, applets: list[str], init: bytes, modules: Sequence[Module],
                      nic_modules: Sequence[Module] = ()) -> list[Entry]:
    """The base initramfs. `lib/modules/load-order` lists the modules every guest loads,
    `load-order.nic` those the init loads only for a job with NICs (images/init)."""
    entries = [Entry.dir(d) for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc",
                                      "sbin", "sys", "usr", "usr/bin", "usr/sbin")]
    entries += [Entry.dir("root", 0o700), Entry.dir("tmp", 0o1777)]
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    entries.append(Entry.chardev("dev/console", 5, 1))
    entries.append(Entry.file("bin/busybox", busybox, 0o755))
    entries.append(Entry.file("init", init, 0o755))
    taken = {e.name for e in entries}
    entries += [Entry.symlink(path, "/bin/busybox") for path in applets if path not in taken]
    entries += [Entry.file(path, text.encode()) for path, text in ETC_FILES.items()]
    entries += [Entry.file(f"lib/modules/{m.name}.ko", m.elf) for m in (*modules, *nic_modules)]
    for name, group in (("load-order", modules), ("load-order.nic", nic_modules)):
        order = "".join(f"{m.name}.ko\n" for m in group)
        entries.append(Entry.file(f"lib/modules/{name}", order.encode()))
    return entries


# ---------------------------------------------------------------- the store of images


def images_dir(spool: Path) -> Path:
    return spool / "images"


def _mkdirs(path: Path) -> None:
    """Create missing directories world-traversable: QEMU runs as another user and must reach
    the kernel and initrd below them whatever the caller's umask."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        os.chmod(directory, 0o755)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_tag(name: str) -> str:
    if not TAG_RE.fullmatch(name):
        raise UsageError(f"bad image name {name!r}: use letters, digits, '.', '_', '-' "
                          "(at most 64, starting with a letter or digit)")
    return name


def _load(spool: Path, image_id: str, name: str) -> Image | None:
    home = images_dir(spool) / image_id
    try:
        manifest = json.loads((home / "manifest.json").read_text())
        kernel, initrd = home / "vmlinuz", home / "initrd"
        size = kernel.stat().st_size + initrd.stat().st_size
    except (OSError, ValueError):
        return None
    # Either may be missing (a kernel without PVH, a host without qboot): the guest then
    # boots the bzImage with QEMU's default firmware.
    vmlinux, firmware = home / "vmlinux", home / "qboot.rom"
    extras = [path for path in (vmlinux, firmware) if path.is_file()]
    return Image(image_id, name, kernel, initrd, str(manifest.get("kernel_version", "?")),
                 size + sum(path.stat().st_size for path in extras),
                 vmlinux=vmlinux if vmlinux in extras else None,
                 firmware=firmware if firmware in extras else None)


def _tags(spool: Path) -> dict[str, str]:
    tags_dir = images_dir(spool) / "tags"
    if not tags_dir.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(tags_dir.iterdir())
            if not p.name.startswith(".") and p.is_file()}


def _image_ids(spool: Path) -> list[str]:
    root = images_dir(spool)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if re.fullmatch(f"[0-9a-f]{{{ID_LENGTH}}}", p.name)
                  and (p / "manifest.json").exists())


def list_images(spool: Path) -> list[Image]:
    """Every tagged image by tag, then images no tag points to (name "")."""
    images = [img for tag, image_id in _tags(spool).items()
              if (img := _load(spool, image_id, tag)) is not None]
    tagged = {img.id for img in images}
    images += [img for image_id in _image_ids(spool) if image_id not in tagged
               if (img := _load(spool, image_id, "")) is not None]
    return images


def resolve_image(spool: Path, name_or_id: str) -> Image:
    """An image by tag, by id, or by a unique id prefix of at least 4 characters."""
    tags = _tags(spool)
    if name_or_id in tags:
        image = _load(spool, tags[name_or_id], name_or_id)
        if image is None:
            raise NotFound(f"image '{name_or_id}' ({tags[name_or_id]}) is incomplete or "
                           "missing; run 'vmjob image build'")
        return image
    if len(name_or_id) >= 4:
        ids = [i for i in _image_ids(spool) if i.startswith(name_or_id)]
        if len(ids) == 1:
            image = _load(spool, ids[0], next((t for t, i in tags.items() if i == ids[0]), ""))
            if image is not None:
                return image
    if not tags and not _image_ids(spool):
        raise NotFound(f"unknown image '{name_or_id}' (no images yet; run 'vmjob image build')")
    known = ", ".join(tags) or "untagged ids only, see 'vmjob image list'"
    raise NotFound(f"unknown image '{name_or_id}' (known: {known})")


# ---------------------------------------------------------------- building


@dataclass(frozen=True)
class _Plan:
    """What an image is made of, known before anything is downloaded or unpacked: enough to
    name it, and so to find out that it already exists."""

    digest: dict[str, Any]  # hashed into the id; recorded in the manifest
    busybox: Deb
    kernel_deb: Deb | None = None  # the Debian cloud kernel, or else:
    kernel: Path | None = None  # --kernel, with
    modules: tuple[Module, ...] = ()  # its modules from the host's /lib/modules
    nic_modules: tuple[Module, ...] = ()
    firmware: Path | None = None  # qboot.rom to copy into the image

    @property
    def id(self) -> str:
        canonical = json.dumps(self.digest, sort_keys=True, separators=(",", ":"))
        return sha256_bytes(canonical.encode())[:ID_LENGTH]


def _deb_digest(deb: Deb) -> dict[str, str]:
    return {"package": deb.package, "version": deb.version, "sha256": deb.sha256}


def _plan(spool: Path, kernel: Path | None, progress: Progress) -> _Plan:
    digest: dict[str, Any] = {
        "recipe": RECIPE_VERSION,
        "init_sha256": sha256_bytes(recipe_bytes("init")),
        "modules_txt_sha256": sha256_bytes(recipe_bytes("modules.txt")),
    }
    modules: tuple[Module, ...] = ()
    nic_modules: tuple[Module, ...] = ()
    firmware = QBOOT_ROM if QBOOT_ROM.is_file() else None
    if firmware is not None:
        digest["qboot_sha256"] = sha256_file(firmware)
    if kernel is not None:  # checked first: a wrong --kernel fails before any apt work
        version = bzimage_version(kernel)
        moddir = MODULES_ROOT / version
        if not moddir.is_dir():
            raise VmjobsError(f"no modules for kernel {version}: looked in {moddir}, which "
                              "does not exist (install the modules matching --kernel)")
        progress(f"resolving modules of {version} in {moddir}")
        base, nics = resolve_module_groups(moddir)
        modules, nic_modules = tuple(base), tuple(nics)
        digest["kernel"] = {"version": version, "sha256": sha256_file(kernel)}
        digest["modules"] = {m.name: sha256_bytes(m.elf) for m in (*modules, *nic_modules)}
    progress(f"resolving {BUSYBOX_PACKAGE}" + ("" if kernel else f", {KERNEL_META_PACKAGE}"))
    busybox, kdeb = resolve_debs_cached(spool, with_kernel=kernel is None)
    digest["busybox_deb"] = _deb_digest(busybox)
    if kdeb is not None:
        # apt's sha256 of the .deb (checked on download) stands for every byte of the kernel
        # and modules in it, so an existing image is found without downloading anything.
        digest["kernel_deb"] = _deb_digest(kdeb)
    return _Plan(digest, busybox, kernel_deb=kdeb, kernel=kernel, modules=modules,
                 nic_modules=nic_modules, firmware=firmware)


def build_image(spool: Path, kernel: Path | None = None, name: str = "default",
                progress: Progress = _quiet) -> tuple[Image, bool]:
    """Build (or find) the image for the current inputs and tag it `name`.

    Returns the image and whether it was built now; False means it existed and nothing was
    done but re-pointing the tag.
    """
    check_tag(name)
    if kernel is not None and not kernel.is_file():
        raise UsageError(f"--kernel {kernel}: no such file")
    plan = _plan(spool, kernel, progress)
    root = images_dir(spool)
    _mkdirs(root / "tags")
    home = root / plan.id
    built = False
    if _load(spool, plan.id, name) is None:
        _build(spool, plan, home, progress)
        built = True
    else:
        progress(f"image {plan.id} is already built")
    _write_atomic(root / "tags" / name, f"{plan.id}\n".encode())
    image = _load(spool, plan.id, name)
    if image is None:
        raise VmjobsError(f"image {plan.id} vanished from {root} while it was being tagged")
    return image, built


def _build(spool: Path, plan: _Plan, home: Path, progress: Progress) -> None:
    cache = spool / "cache"
    _mkdirs(cache)
    started = time.monotonic()
    busybox_deb = fetch_deb(plan.busybox, cache, progress)
    kernel_deb_path = fetch_deb(plan.kernel_deb, cache, progress) if plan.kernel_deb else None
    # Everything is written under a private directory next to its final place and renamed
    # into place complete: an interrupted build leaves no image that looks finished.
    work = Path(tempfile.mkdtemp(dir=home.parent, prefix=f".build-{plan.id}-"))
    try:
        out = work / "image"
        out.mkdir()
        progress(f"unpacking {plan.busybox.describe()}")
        unpack_deb(busybox_deb, work / "busybox")
        busybox = work / "busybox" / "bin" / "busybox"
        if not busybox.is_file():
            raise VmjobsError(f"{busybox_deb.name} has no bin/busybox")
        if kernel_deb_path is not None and plan.kernel_deb is not None:
            progress(f"unpacking {plan.kernel_deb.describe()}")
            unpack_deb(kernel_deb_path, work / "kernel")
            kernel, version = _deb_kernel(work / "kernel")
            moddir = work / "kernel" / "lib" / "modules" / version
            progress("resolving modules")
            modules, nic_modules = resolve_module_groups(moddir)
        else:
            assert plan.kernel is not None
            kernel, version = plan.kernel, bzimage_version(plan.kernel)
            modules, nic_modules = list(plan.modules), list(plan.nic_modules)
        progress(f"packing {len(modules)} modules: {' '.join(m.name for m in modules)}; for "
                 f"jobs with NICs {len(nic_modules)}: {' '.join(m.name for m in nic_modules)}")
        shutil.copyfile(kernel, out / "vmlinuz")
        _write_boot_extras(plan, kernel, out, progress)
        progress("writing initrd")
        entries = initramfs_entries(busybox, busybox_applets(busybox), recipe_bytes("init"),
                                    modules, nic_modules)
        with (out / "initrd").open("wb") as handle:
            write_gzip_newc(entries, handle)
        manifest = _manifest(plan, out, version, modules + nic_modules,
                             time.monotonic() - started)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in out.iterdir():
            os.chmod(path, 0o644)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(out, 0o755)
        try:
            os.rename(out, home)
        except OSError:
            # Another build of the same inputs finished first; its image is identical.
            if _load(spool, plan.id, "") is None:
                raise
        size = sum(path.stat().st_size for path in home.iterdir())
        progress(f"image {plan.id} ready: kernel {version}, {size / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_boot_extras(plan: _Plan, kernel: Path, out: Path, progress: Progress) -> None:
    """vmlinux and qboot.rom into `out` when they can be had; each is optional (_load)."""
    elf, why_not = extract_vmlinux(kernel)
    if elf is None:
        progress(f"booting the compressed kernel: no uncompressed one ({why_not})")
    else:
        (out / "vmlinux").write_bytes(elf)
    if plan.firmware is None:
        progress(f"no {QBOOT_ROM}: guests boot with QEMU's default firmware")
    else:
        shutil.copyfile(plan.firmware, out / "qboot.rom")
        if sha256_file(out / "qboot.rom") != plan.digest["qboot_sha256"]:
            raise VmjobsError(f"{plan.firmware} changed during the build; build again")


def _deb_kernel(root: Path) -> tuple[Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise VmjobsError(f"expected one boot/vmlinuz-* in the kernel package, found "
                          f"{len(kernels)}")
    version = bzimage_version(kernels[0])
    if not (root / "lib" / "modules" / version).is_dir():
        raise VmjobsError(f"the kernel package has no lib/modules/{version}")
    return kernels[0], version


def _manifest(plan: _Plan, out: Path, version: str, modules: list[Module],
              seconds: float) -> dict[str, Any]:
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
             for name in ("vmlinuz", "initrd", "vmlinux", "qboot.rom") if (out / name).exists()}
    return {
        "id": plan.id,
        "kernel_version": version,
        "inputs": plan.digest,
        "modules": [{"name": m.name, "sha256": sha256_bytes(m.elf)} for m in modules],
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 2),
    }
