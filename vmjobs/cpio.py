"""A reproducible writer for newc ("070701") cpio archives, the format the kernel unpacks as an
initramfs.

Written here rather than by piping `find | cpio` so the bytes depend only on the entries: no
host uids, no inode numbers, no timestamps unless given, and a fixed order. Same entries, same
bytes — which is what makes the guest image content-addressable and its rebuilds checkable.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MAX_FILE_SIZE = 0xFFFFFFFF  # newc keeps sizes in 8 hex digits
_CHUNK = 1 << 20


class CpioError(ValueError):
    """An entry newc cannot hold, or a source file that changed while it was being packed."""


@dataclass(frozen=True)
class Entry:
    """One archive member. `name` is relative ("bin/sh"), never starting with "/"."""

    name: str
    mode: int  # full st_mode: type bits + permissions
    data: bytes | Path = b""  # file contents (a Path is streamed), or a symlink's target
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @staticmethod
    def dir(name: str, perm: int = 0o755, mtime: int = 0) -> Entry:
        return Entry(name, stat.S_IFDIR | perm, mtime=mtime)

    @staticmethod
    def file(name: str, data: bytes | Path, perm: int = 0o644, mtime: int = 0) -> Entry:
        return Entry(name, stat.S_IFREG | perm, data, mtime=mtime)

    @staticmethod
    def symlink(name: str, target: str) -> Entry:
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def size(self) -> int:
        if isinstance(self.data, Path):
            return self.data.stat().st_size
        return len(self.data)


def _header(ino: int, entry: Entry, name: bytes, size: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, entry.mtime, size, 0, 0,
              entry.rdev[0], entry.rdev[1], len(name) + 1, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(out: BinaryIO, written: int) -> int:
    extra = -written % 4
    out.write(b"\0" * extra)
    return extra


def _check(entry: Entry, name: bytes, size: int) -> None:
    if not name or name.startswith(b"/") or b"\0" in name:
        raise CpioError(f"bad archive member name {entry.name!r}")
    if size > MAX_FILE_SIZE:
        raise CpioError(f"{entry.name}: {size} bytes is more than a cpio member can hold (4 GiB)")
    if not 0 <= entry.mtime <= 0xFFFFFFFF:
        raise CpioError(f"{entry.name}: mtime {entry.mtime} does not fit a cpio header")


def write_newc(entries: Iterable[Entry], out: BinaryIO) -> int:
    """Write `entries` sorted by name as one newc archive with its trailer; return bytes written.

    Sorting puts every directory before its contents (a prefix sorts first), which the kernel's
    unpacker needs, and makes the order independent of how the caller collected the entries.
    Inode numbers are assigned in that order; owners are always root.
    """
    ordered = sorted(entries, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    seen: set[str] = set()
    total = 0
    for ino, entry in enumerate(ordered, start=1):
        if entry.name in seen:
            raise CpioError(f"duplicate archive member {entry.name!r}")
        seen.add(entry.name)
        total += _write_entry(out, ino, entry)
    total += _write_entry(out, len(ordered) + 1, Entry(TRAILER, 0))
    # Pad to 512 like cpio(1) does; the kernel skips the zeros between concatenated archives.
    total += _pad_to(out, total, 512)
    return total


def _pad_to(out: BinaryIO, written: int, block: int) -> int:
    extra = -written % block
    out.write(b"\0" * extra)
    return extra


def _write_entry(out: BinaryIO, ino: int, entry: Entry) -> int:
    name = entry.name.encode("utf-8", "surrogateescape")
    size = entry.size() if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode) else 0
    _check(entry, name, size)
    head = _header(ino, entry, name, size) + name + b"\0"
    out.write(head)
    written = len(head) + _pad(out, len(head))
    if size:
        if isinstance(entry.data, Path):
            _copy_exact(entry.data, out, size, entry.name)
        else:
            out.write(entry.data)
        written += size + _pad(out, size)
    return written


def _copy_exact(src: Path, out: BinaryIO, size: int, name: str) -> None:
    # The header already promised `size` bytes: a file that grew or shrank since would corrupt
    # every member after it, so refuse instead.
    left = size
    with src.open("rb") as handle:
        while left:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
        if left or handle.read(1):
            raise CpioError(f"{name}: file changed size while being packed")


def write_gzip_newc(entries: Iterable[Entry], out: BinaryIO, level: int = 9) -> None:
    """A gzip-compressed newc archive with a fixed gzip header (no name, mtime 0)."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level,
                       mtime=0) as gz:
        write_newc(entries, gz)  # type: ignore[arg-type]
