"""Untrusted tar extraction with and without Python's `data` filter.

Debian 12's Python (3.11.2) has no `tarfile.data_filter` (3.11.4+): there `extract_data`
applies the rules itself. Each test runs twice: with this Python's tarfile as it is, and with
the filter removed, which is what 3.11.2 looks like (the suite itself runs on 3.11.2 in CI).
"""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from vmjobs import guest_protocol as gp
from vmjobs.safetar import RefusedMember, extract_data, has_data_filter


@pytest.fixture(params=["this-python", "no-data-filter"])
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "no-data-filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        assert not has_data_filter()
    return str(request.param)


def tar_of(add: Callable[[tarfile.TarFile], None]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:")


def member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_detection_matches_the_python_version() -> None:
    # 3.11.4 added the filter; a 3.11.2 (Debian 12) that claimed it would be a TypeError later
    assert has_data_filter() == (sys.version_info >= (3, 11, 4))


def test_plain_data_is_extracted_without_privileges(tmp_path: Path, variant: str) -> None:
    def add(tar: tarfile.TarFile) -> None:
        member(tar, ".", type=tarfile.DIRTYPE, mode=0o755)
        member(tar, "./d", type=tarfile.DIRTYPE, mode=0o777)
        member(tar, "./d/f.txt", b"data\n", mode=0o666, uid=4242, gid=4242,
               uname="nobody-here", gname="nobody-here")
        member(tar, "./suid", b"#!/bin/sh\n", mode=0o6777)
        member(tar, "./e/deep/g", b"12345", mode=0o400)  # parents missing from the archive

    with tar_of(add) as tar:
        extract_data(tar, tmp_path)
    f = (tmp_path / "d" / "f.txt").stat()
    assert (tmp_path / "d" / "f.txt").read_text() == "data\n"
    assert (f.st_uid, f.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(f.st_mode) == 0o644  # group/other write dropped
    assert stat.S_IMODE((tmp_path / "suid").stat().st_mode) == 0o755  # setuid/setgid dropped
    assert stat.S_IMODE((tmp_path / "e" / "deep" / "g").stat().st_mode) == 0o600  # owner rw
    assert (tmp_path / "e" / "deep" / "g").read_text() == "12345"


HOSTILE: dict[str, Callable[[tarfile.TarFile], None]] = {
    "dotdot": lambda t: member(t, "../escape", b"x"),
    "absolute": lambda t: member(t, "/tmp/escape", b"x"),
    "symlink-out": lambda t: member(t, "l", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink-out": lambda t: member(t, "h", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    "chardev": lambda t: member(t, "null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    "fifo": lambda t: member(t, "p", type=tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused(tmp_path: Path, variant: str, case: str) -> None:
    def add(tar: tarfile.TarFile) -> None:
        member(tar, "first", b"ok")
        HOSTILE[case](tar)

    dest = tmp_path / "dest"
    dest.mkdir()
    if case == "absolute" and has_data_filter():
        # Python's filter strips the leading "/" instead: the file lands inside dest
        with tar_of(add) as tar:
            extract_data(tar, dest)
        assert (dest / "tmp" / "escape").read_bytes() == b"x"
        return
    with tar_of(add) as tar, pytest.raises(tarfile.TarError) as info:
        extract_data(tar, dest)
    assert not (tmp_path / "escape").exists()
    if not has_data_filter():
        # our rules run before anything is written, and say which member broke them
        assert isinstance(info.value, RefusedMember)
        assert "\n" not in str(info.value)
        assert list(dest.iterdir()) == []


def test_job_output_is_collected_without_the_filter(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole collection path on a Python without the filter: it used to raise TypeError
    from extractall(filter=...), leaving the job uncollected."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        member(tar, ".", type=tarfile.DIRTYPE, mode=0o755)
        member(tar, "./result.txt", b"42\n", mode=0o4755)
    disk = tmp_path / "out.raw"
    with disk.open("wb") as handle:
        handle.write(b"VMJOB-OUT 1 7 ok\n".ljust(512, b"\0") + buf.getvalue())
        handle.truncate(1 << 20)
    result = gp.read_output(disk, tmp_path / "out")
    assert result == gp.GuestResult(7, "ok", 1, 3)
    assert (tmp_path / "out" / "result.txt").read_text() == "42\n"
    assert not (tmp_path / "out" / "result.txt").stat().st_mode & stat.S_ISUID
