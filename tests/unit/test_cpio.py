"""The newc writer: reproducible bytes that the system cpio (and so the kernel) unpacks."""

from __future__ import annotations

import gzip
import io
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from vmjobs.cpio import CpioError, Entry, write_gzip_newc, write_newc


def sample(tmp_path: Path) -> list[Entry]:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 4099)  # streamed from disk, size not a multiple of 4
    return [
        Entry.dir("bin"),
        Entry.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755, mtime=1_700_000_000),
        Entry.symlink("bin/sh", "/bin/busybox"),
        Entry.dir("data dir", 0o700),
        Entry.file("data dir/a b.txt", b"spaces\n"),
        Entry.file("data dir/empty", b""),
        Entry.file("data dir/big.bin", big),
        Entry.dir("tmp", 0o1777),
        Entry.file("odd", b"x" * 5, 0o600),
    ]


def unpack(archive: bytes, into: Path) -> None:
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=into, check=True)


def test_same_entries_in_any_order_give_the_same_bytes(tmp_path: Path) -> None:
    entries = sample(tmp_path)
    first, second = io.BytesIO(), io.BytesIO()
    write_newc(entries, first)
    shuffled = entries[:]
    random.Random(7).shuffle(shuffled)
    write_newc(shuffled, second)
    assert first.getvalue() == second.getvalue()
    assert len(first.getvalue()) % 512 == 0


def test_gzip_output_is_byte_identical_across_runs(tmp_path: Path) -> None:
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        write_gzip_newc(sample(tmp_path), buf)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    # gzip header: no file name, mtime 0 — nothing that depends on when or where.
    assert outs[0][3] & 0x08 == 0
    assert outs[0][4:8] == b"\0\0\0\0"


def test_system_cpio_unpacks_it(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_gzip_newc(sample(tmp_path), buf)
    root = tmp_path / "root"
    unpack(gzip.decompress(buf.getvalue()), root)
    assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o755
    assert (root / "bin/tool").stat().st_mtime == 1_700_000_000
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert (root / "data dir/a b.txt").read_text() == "spaces\n"
    assert (root / "data dir/empty").read_bytes() == b""
    assert (root / "data dir/big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert stat.S_IMODE((root / "data dir").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert (root / "odd").read_bytes() == b"xxxxx"


def test_listing_shows_root_owner_and_fixed_order(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_newc(sample(tmp_path), buf)
    listing = subprocess.run(["cpio", "-t", "--quiet", "-v", "--numeric-uid-gid"],
                             input=buf.getvalue(), capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    names = subprocess.run(["cpio", "-t", "--quiet"], input=buf.getvalue(),
                           capture_output=True, check=True).stdout.decode().splitlines()
    assert names == sorted(names)
    assert all(line.split()[2:4] == ["0", "0"] for line in lines)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_device_node(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_newc([Entry.dir("dev"), Entry.chardev("dev/console", 5, 1)], buf)
    root = tmp_path / "root"
    unpack(buf.getvalue(), root)
    st = (root / "dev/console").lstat()
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


@pytest.mark.parametrize("name", ["/etc/passwd", "", "a\0b"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(CpioError):
        write_newc([Entry.file(name, b"x")], io.BytesIO())


def test_duplicates_are_refused() -> None:
    with pytest.raises(CpioError, match="duplicate"):
        write_newc([Entry.file("a", b"1"), Entry.file("a", b"2")], io.BytesIO())


def test_file_that_changes_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"12345678")

    class Shrinking(Entry):
        def size(self) -> int:  # the size as it was when the header was written
            size = super().size()
            path.write_bytes(b"1234")
            return size

    with pytest.raises(CpioError, match="changed size"):
        write_newc([Shrinking("f", stat.S_IFREG | 0o644, path)], io.BytesIO())
