"""A job in a real guest that forges its output disk: the host refuses it and writes nothing.

The job runs as root inside its guest, so it can write anything to the output disk and power
off before the init writes the honest archive. The hostile archives are built here with
`tarfile` and handed to the job through --input.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.guest.conftest import Env
from tests.guest.test_run import assert_nothing_left

pytestmark = pytest.mark.guest

HEADER = b"VMJOB-OUT 1 0 ok\n".ljust(512, b"\0")
FORGE = (
    "dd if=header of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null;"
    " dd if=evil.tar of=/dev/vda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null;"
    " sync; echo forged; poweroff -f"
)


def traversal() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = b"escaped\n"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def symlink_out() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("passwd-link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


def oversize() -> bytes:
    # A member that claims 1 GiB on a 256 MiB disk: refused from its header alone.
    info = tarfile.TarInfo("huge.bin")
    info.size = 1 << 30
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 4096


@pytest.mark.parametrize("archive, member", [
    (traversal, "escaped.txt"),
    (symlink_out, "passwd-link"),
    (oversize, "huge.bin"),
], ids=["dotdot", "symlink", "oversize"])
def test_hostile_output_is_refused(guest_env: Env, tmp_path: Path, archive, member: str) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "header").write_bytes(HEADER)
    (inp / "evil.tar").write_bytes(archive())
    before = set(guest_env.spool.rglob("*"))
    result = guest_env.vmjob("run", "--input", str(inp), "--output", str(out), "--",
                             "sh", "-c", FORGE)
    assert result.returncode == 125, result.stderr
    assert "forged" in result.stdout
    assert "output refused" in result.stderr
    assert member.split("/")[-1] in result.stderr
    # Nothing of the archive was written anywhere: not in --output, not in the job's out/,
    # not beside it.
    assert not out.exists() or not any(out.iterdir())
    new = set(guest_env.spool.rglob("*")) - before
    assert not [p for p in new if p.name in ("escaped.txt", "passwd-link", "huge.bin")]
    assert not (tmp_path / "escaped.txt").exists()
    assert_nothing_left(guest_env)
