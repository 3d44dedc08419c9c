"""Host side of the guest protocol: the job's initrd, the console markers, the output disk.

The output disk comes from the guest and is untrusted: the hostile cases here are built in
Python and must be refused with one line, leaving nothing written anywhere.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from vmjobs import guest_protocol as gp
from vmjobs.cpio import Entry, write_gzip_newc
from vmjobs.errors import UnsafeOutput, VmjobsError

# ---------------------------------------------------------------- the job's initrd


@pytest.fixture
def base_initrd(tmp_path: Path) -> Path:
    path = tmp_path / "base.initrd"
    with path.open("wb") as out:
        write_gzip_newc([Entry.file("init", b"#!/bin/sh\n", 0o755), Entry.dir("bin")], out)
    return path


def gzip_members(data: bytes) -> list[bytes]:
    """Each gzip stream of a concatenation, skipping the NUL padding the kernel skips too."""
    parts = []
    while data:
        data = data.lstrip(b"\0")
        if not data:
            break
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        parts.append(d.decompress(data) + d.flush())
        data = d.unused_data
    return parts


def unpack_initrd(path: Path, into: Path) -> None:
    into.mkdir()
    for part in gzip_members(path.read_bytes()):
        subprocess.run(["cpio", "-idm", "--quiet"], input=part, cwd=into, check=True)


def spec(**kw: object) -> gp.JobSpec:
    values: dict[str, object] = dict(job_id="ab12cd34", argv=("sh", "-c", 'echo "$1"', "x"),
                                     env={}, cpus=2, memory_mib=384)
    values.update(kw)
    return gp.JobSpec(**values)  # type: ignore[arg-type]


def test_job_initrd_is_base_then_job_archive(tmp_path: Path, base_initrd: Path) -> None:
    inp = tmp_path / "in"
    (inp / "sub dir").mkdir(parents=True)
    (inp / "sub dir" / "a b.txt").write_text("spaces survive\n")
    (inp / "run.sh").write_text("#!/bin/sh\n")
    (inp / "run.sh").chmod(0o755)
    argv = ("sh", "-c", 'printf "%s\\n" "$@"', "two  words", "", "$(reboot)", "line\nbreak\n")
    env = {"GREETING": "hi there; $(id)", "EMPTY": "", "TRAIL": "x\n\n"}
    dest = tmp_path / "job.initrd"
    gp.write_job_initrd(spec(argv=argv, env=env, input_dir=inp,
                             nics=("0000:00:10.0", "0000:00:11.0")), base_initrd, dest)

    data = dest.read_bytes()
    assert data.startswith(base_initrd.read_bytes())
    root = tmp_path / "root"
    unpack_initrd(dest, root)
    assert (root / "init").exists()
    argv_dir = root / "vmjob" / "argv"
    assert sorted(int(p.name) for p in argv_dir.iterdir()) == list(range(len(argv)))
    assert [(argv_dir / str(i)).read_text() for i in range(len(argv))] == list(argv)
    env_dir = root / "vmjob" / "env"
    got = {p.name: p.read_text() for p in env_dir.iterdir()}
    assert got == {"VMJOB_ID": "ab12cd34", "VMJOB_CPUS": "2", "VMJOB_MEM": "384",
                   "NIC0": "0000:00:10.0", "NIC1": "0000:00:11.0", **env}
    assert (root / "job" / "sub dir" / "a b.txt").read_text() == "spaces survive\n"
    assert (root / "job" / "run.sh").stat().st_mode & 0o111
    # argv, env and inputs: root's alone (libvirt hands the file to QEMU's user while it runs)
    assert os.stat(dest).st_mode & 0o777 == 0o600


def test_job_initrd_without_input_has_empty_job_dir(tmp_path: Path, base_initrd: Path) -> None:
    dest = tmp_path / "job.initrd"
    gp.write_job_initrd(spec(), base_initrd, dest)
    root = tmp_path / "root"
    unpack_initrd(dest, root)
    assert list((root / "job").iterdir()) == []


@pytest.mark.parametrize("kw, message", [
    ({"env": {"1BAD": "x"}}, "--env '1BAD'"),
    ({"env": {"A-B": "x"}}, "--env 'A-B'"),
    ({"env": {"VMJOB_ID": "x"}}, "set by vmjob"),
    ({"env": {"NIC0": "x"}}, "set by vmjob"),
    ({"env": {"A": "x\0y"}}, "NUL"),
    ({"argv": ()}, "no command"),
    ({"argv": ("a\0b",)}, "NUL"),
    ({"job_id": "../x"}, "bad job id"),
    ({"nics": ("eth0",)}, "PCI address"),
    ({"cpus": 0}, "guest size"),
])
def test_bad_specs_are_refused_before_writing(tmp_path: Path, base_initrd: Path,
                                              kw: dict[str, object], message: str) -> None:
    with pytest.raises(VmjobsError, match=message) as info:
        gp.write_job_initrd(spec(**kw), base_initrd, tmp_path / "job.initrd")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.initrd"]


def test_symlink_in_input_is_refused(tmp_path: Path, base_initrd: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "link").symlink_to("/etc/passwd")
    with pytest.raises(VmjobsError, match="is a symlink"):
        gp.write_job_initrd(spec(input_dir=inp), base_initrd, tmp_path / "job.initrd")
    assert not (tmp_path / "job.initrd").exists()


def test_fifo_in_input_is_refused(tmp_path: Path, base_initrd: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    os.mkfifo(inp / "pipe")
    with pytest.raises(VmjobsError, match="not a regular file"):
        gp.write_job_initrd(spec(input_dir=inp), base_initrd, tmp_path / "job.initrd")


def test_input_must_be_a_directory(tmp_path: Path, base_initrd: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path, message in ((tmp_path / "file", "not a directory"),
                          (tmp_path / "missing", "No such file")):
        with pytest.raises(VmjobsError, match=message):
            gp.write_job_initrd(spec(input_dir=path), base_initrd, tmp_path / "job.initrd")


def test_output_disk_is_sparse_and_whole_sectors(tmp_path: Path) -> None:
    disk = tmp_path / "out.raw"
    gp.create_output_disk(disk, 64 << 20)
    st = disk.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20
    gp.create_output_disk(disk, 1500)
    assert disk.stat().st_size == 1536


# ---------------------------------------------------------------- console


def console(job_id: str, job_output: str, rc: int = 0, end: bool = True) -> str:
    """What the serial console shows: the tty turns every \\n into \\r\\n."""
    text = "SeaBIOS noise\nvmjob-init: insmod x.ko failed\n"
    text += f"\n{gp.begin_marker(job_id)}\n{job_output}"
    if end:
        text += f"\n{gp.end_marker(job_id, rc)}\nvmjob-init: after\n[ 5.7] reboot: Power down\n"
    return text.replace("\n", "\r\n")


@pytest.mark.parametrize("output, lines", [
    ("hello\n", ["hello"]),
    ("hello", ["hello"]),  # no final newline: the line is still the job's
    ("a\n\nb\n", ["a", "", "b"]),
    ("a\n\n", ["a", ""]),
    ("", []),
    ("\n", [""]),
    ("  indented\ttab  \n", ["  indented\ttab  "]),
    ("@@vmjob:someone-else:end:0@@\nstill mine\n", ["@@vmjob:someone-else:end:0@@",
                                                    "still mine"]),
])
def test_job_lines_between_markers(output: str, lines: list[str]) -> None:
    parsed = gp.job_lines(console("ab12cd34", output, rc=3), "ab12cd34")
    assert parsed.lines == lines
    assert parsed.exit_code == 3
    assert parsed.notes == ["vmjob-init: insmod x.ko failed", "vmjob-init: after",
                            "[ 5.7] reboot: Power down"]


def test_chunks_split_anywhere_give_the_same_lines() -> None:
    text = console("ab12cd34", "one\ntwo  spaced\n\nlast", rc=0)
    whole = gp.job_lines(text, "ab12cd34")
    parser = gp.ConsoleParser("ab12cd34")
    lines = []
    for char in text:  # worst case: every \r\n and marker split across chunks
        lines += parser.feed(char)
    lines += parser.finish()
    assert lines == whole.lines == ["one", "two  spaced", "", "last"]
    assert parser.exit_code == 0 and parser.ended


def test_lines_stream_as_soon_as_complete() -> None:
    parser = gp.ConsoleParser("j1")
    assert parser.feed(f"\r\n{gp.begin_marker('j1')}\r\nfirst\r\nsec") == ["first"]
    assert parser.started and not parser.ended
    assert parser.feed("ond\r\n") == ["second"]


def test_console_without_end_marker_flushes_on_finish() -> None:
    parsed = gp.job_lines(console("j1", "ready\npartial", end=False), "j1")
    assert parsed.lines == ["ready", "partial"]
    assert parsed.exit_code is None


def test_console_without_begin_has_no_job_lines() -> None:
    parsed = gp.job_lines(["Kernel panic\r\n", "vmjob-init: no job\r\n"], "j1")
    assert parsed.lines == [] and parsed.exit_code is None
    assert parsed.notes == ["vmjob-init: no job"]


# ---------------------------------------------------------------- output disk

DISK_SIZE = 1 << 20


def header(rc: str = "0", status: str = "ok") -> bytes:
    return f"VMJOB-OUT 1 {rc} {status}\n".encode().ljust(512, b"\0")


def tar_bytes(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar)
    return buf.getvalue()


def member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_disk(path: Path, head: bytes, tar: bytes = b"", size: int = DISK_SIZE) -> Path:
    with path.open("wb") as disk:
        disk.write(head + tar)
        disk.truncate(size)  # cuts what does not fit, like a real disk would
    return path


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    return d


def assert_nothing_written(jobdir: Path) -> None:
    # Only the disk itself: no dest, no temporary directory, nothing beside the job dir.
    assert sorted(p.name for p in jobdir.iterdir()) == ["out.raw"]
    assert sorted(p.name for p in jobdir.parent.iterdir()) == ["job"]


def good_tar(tar: tarfile.TarFile) -> None:
    member(tar, ".", type=tarfile.DIRTYPE, mode=0o755)
    member(tar, "./d", type=tarfile.DIRTYPE, mode=0o755)
    member(tar, "./d/a b.txt", b"data\n", mode=0o644)
    member(tar, "./suid", b"#!/bin/sh\n", mode=0o4755)
    member(tar, "./e/deep/f", b"12345")  # parent dirs missing from the archive


def test_reads_exit_code_and_extracts(jobdir: Path) -> None:
    disk = make_disk(jobdir / "out.raw", header("3"), tar_bytes(good_tar))
    result = gp.read_output(disk, jobdir / "out")
    assert result == gp.GuestResult(3, "ok", 3, 5 + 10 + 5)
    out = jobdir / "out"
    assert (out / "d" / "a b.txt").read_text() == "data\n"
    assert (out / "e" / "deep" / "f").read_text() == "12345"
    assert not (out / "suid").stat().st_mode & stat.S_ISUID  # the data filter strips it
    assert sorted(p.name for p in jobdir.iterdir()) == ["out", "out.raw"]


def test_empty_output_dir(jobdir: Path) -> None:
    disk = make_disk(jobdir / "out.raw", header("0"),
                     tar_bytes(lambda t: member(t, ".", type=tarfile.DIRTYPE)))
    assert gp.read_output(disk, jobdir / "out") == gp.GuestResult(0, "ok", 0, 0)
    assert list((jobdir / "out").iterdir()) == []


def test_guest_that_never_wrote_a_header(jobdir: Path) -> None:
    disk = jobdir / "out.raw"
    gp.create_output_disk(disk, DISK_SIZE)
    assert gp.read_output(disk, jobdir / "out") == gp.GuestResult(None, "missing", 0, 0)
    assert_nothing_written(jobdir)


@pytest.mark.parametrize("rc, status, expected", [
    ("7", "overflow", gp.GuestResult(7, "overflow", 0, 0)),
    ("7", "overflow 6003200 4193792", gp.GuestResult(7, "overflow", 0, 0, 6003200, 4193792)),
    ("-", "error", gp.GuestResult(None, "error", 0, 0)),
    ("0", "error", gp.GuestResult(0, "error", 0, 0)),
])
def test_header_without_tar(jobdir: Path, rc: str, status: str,
                            expected: gp.GuestResult) -> None:
    disk = make_disk(jobdir / "out.raw", header(rc, status), b"garbage that is not read")
    assert gp.read_output(disk, jobdir / "out") == expected
    assert_nothing_written(jobdir)


def hostile(name: str) -> tuple[bytes, bytes, int, str]:
    """(header, tar, disk size, expected message) for one hostile disk."""
    ok = header("0")
    cases: dict[str, tuple[bytes, bytes, int, str]] = {
        "dotdot": (ok, tar_bytes(lambda t: (member(t, "./fine", b"x"),
                                            member(t, "../escape", b"owned"))), DISK_SIZE,
                   r"'\.\./escape'.*leaves"),
        "dotdot-inside": (ok, tar_bytes(lambda t: member(t, "a/../../escape", b"x")),
                          DISK_SIZE, "leaves"),
        "absolute": (ok, tar_bytes(lambda t: member(t, "/tmp/escape", b"x")), DISK_SIZE,
                     "'/tmp/escape'.*absolute"),
        "symlink": (ok, tar_bytes(lambda t: member(t, "link", type=tarfile.SYMTYPE,
                                                   linkname="/etc")), DISK_SIZE,
                    "'link'.*symlink"),
        "symlink-then-file": (ok, tar_bytes(lambda t: (
            member(t, "d", type=tarfile.SYMTYPE, linkname="../.."),
            member(t, "d/escape", b"x"))), DISK_SIZE, "symlink"),
        "hardlink": (ok, tar_bytes(lambda t: member(t, "hl", type=tarfile.LNKTYPE,
                                                    linkname="/etc/shadow")), DISK_SIZE,
                     "'hl'.*hardlink"),
        "chardev": (ok, tar_bytes(lambda t: member(t, "null", type=tarfile.CHRTYPE,
                                                   devmajor=1, devminor=3)), DISK_SIZE,
                    "'null'.*device"),
        "blockdev": (ok, tar_bytes(lambda t: member(t, "sda", type=tarfile.BLKTYPE)),
                     DISK_SIZE, "device"),
        "fifo": (ok, tar_bytes(lambda t: member(t, "p", type=tarfile.FIFOTYPE)), DISK_SIZE,
                 "'p'.*fifo"),
        "oversize": (ok, tar_bytes(lambda t: member(t, "big", b"x" * 300_000)), 256 << 10,
                     "'big' declares 300000 bytes, more than the disk holds"),
        "garbage-tar": (ok, b"this is not a tar archive".ljust(1024, b"!"), DISK_SIZE,
                        "not a readable tar"),
        "no-tar": (ok, b"", DISK_SIZE, "archive is empty"),
        "garbage-after-member": (ok, tar_bytes(lambda t: member(t, "f", b"x"))[:1024]
                                 + b"junk".ljust(512, b"!"), DISK_SIZE,
                                 "damaged header after member 'f'"),
        "garbage-header": (b"\x7fELF garbage".ljust(512, b"\xff"), b"", DISK_SIZE,
                           "header is not valid"),
        "header-no-newline": (b"VMJOB-OUT 1 0 ok".ljust(512, b"\0"), b"", DISK_SIZE,
                              "header is not valid"),
        "header-junk-after": (b"VMJOB-OUT 1 0 ok\n\0\0x".ljust(512, b"\0"), b"", DISK_SIZE,
                              "header is not valid"),
        "header-rc-too-big": (header("999"), b"", DISK_SIZE, "more than 255"),
        "header-rc-negative": (header("-1"), b"", DISK_SIZE, "header is not valid"),
        "header-version-2": (b"VMJOB-OUT 2 0 ok\n".ljust(512, b"\0"), b"", DISK_SIZE,
                             "header is not valid"),
        "truncated-disk": (b"VMJOB-OUT 1 0", b"", 13, "truncated"),
    }
    return cases[name]


HOSTILE = ["dotdot", "dotdot-inside", "absolute", "symlink", "symlink-then-file", "hardlink",
           "chardev", "blockdev", "fifo", "oversize", "garbage-tar", "no-tar",
           "garbage-after-member", "garbage-header",
           "header-no-newline", "header-junk-after", "header-rc-too-big", "header-rc-negative",
           "header-version-2", "truncated-disk"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_disks_are_refused_and_nothing_is_written(jobdir: Path, case: str) -> None:
    head, tar, size, message = hostile(case)
    disk = make_disk(jobdir / "out.raw", head, tar, size)
    with pytest.raises(UnsafeOutput, match=message) as info:
        gp.read_output(disk, jobdir / "out")
    assert "\n" not in str(info.value)
    assert_nothing_written(jobdir)


def test_total_size_over_the_limit_is_refused_before_writing(jobdir: Path) -> None:
    def two_files(tar: tarfile.TarFile) -> None:
        member(tar, "a", b"x" * 4000)
        member(tar, "b", b"y" * 4000)  # each fits, together they do not

    disk = make_disk(jobdir / "out.raw", header("0"), tar_bytes(two_files))
    with pytest.raises(UnsafeOutput, match="8000 bytes, more than the 5000 allowed"):
        gp.read_output(disk, jobdir / "out", max_bytes=5000)
    assert_nothing_written(jobdir)


def test_member_size_lying_past_the_disk_end_is_refused(jobdir: Path) -> None:
    # A header that claims 10 GiB of data on a 1 MiB disk.
    info = tarfile.TarInfo("huge")
    info.size = 10 << 30
    head = info.tobuf(tarfile.GNU_FORMAT)
    disk = make_disk(jobdir / "out.raw", header("0"), head)
    with pytest.raises(UnsafeOutput, match="'huge' declares 10737418240 bytes"):
        gp.read_output(disk, jobdir / "out")
    assert_nothing_written(jobdir)


def test_compressed_tar_is_not_decompressed(jobdir: Path) -> None:
    disk = make_disk(jobdir / "out.raw", header("0"),
                     gzip.compress(tar_bytes(lambda t: member(t, "f", b"x"))))
    with pytest.raises(UnsafeOutput, match="not a readable tar"):
        gp.read_output(disk, jobdir / "out")
    assert_nothing_written(jobdir)


def test_existing_destination_is_not_overwritten(jobdir: Path) -> None:
    (jobdir / "out").mkdir()
    (jobdir / "out" / "keep").write_text("mine")
    disk = make_disk(jobdir / "out.raw", header("0"), tar_bytes(good_tar))
    with pytest.raises(VmjobsError, match="already exists"):
        gp.read_output(disk, jobdir / "out")
    assert [p.name for p in (jobdir / "out").iterdir()] == ["keep"]


# --- console segments of a job that moves ----------------------------------------------------


def test_console_segments_one_file_per_stay(tmp_path: Path) -> None:
    from vmjobs.guest import JobFiles, console_segments

    files = JobFiles(tmp_path)
    # recovery / failed moves repeat a host in a row: still one stay
    ran_on = ["h1", "h1", "h2", "h1", "h1", "h3", "h2"]
    assert console_segments(ran_on) == [("h1", 0), ("h2", 0), ("h1", 1), ("h3", 0), ("h2", 1)]
    assert files.console("h1") == tmp_path / "console.h1.log"
    assert files.console("h1", 1) == tmp_path / "console.h1.1.log"
    # the next stay: a new file on a host it left, the same file where it stays
    assert files.next_console(ran_on, "h1") == tmp_path / "console.h1.2.log"
    assert files.next_console(ran_on, "h2") == tmp_path / "console.h2.1.log"
    assert files.next_console(ran_on, "h4") == tmp_path / "console.h4.log"
    assert files.next_console([], "h1") == tmp_path / "console.h1.log"


@pytest.mark.parametrize("rc, status, reason", [
    ("0", "overflow 6003200 4193792",
     "output refused: /job/out needs 6003200 bytes as a tar and the output disk holds 4193792; "
     "raise output_disk_size (the job itself exited with status 0)"),
    ("0", "overflow", "output refused: /job/out is larger than the output disk; raise "
                      "output_disk_size (the job itself exited with status 0)"),
    ("0", "error", "the guest could not write /job/out to its output disk (the job itself "
                   "exited with status 0); console log: "),
])
def test_a_refused_output_fails_the_job_whatever_its_own_exit_status(
        tmp_path: Path, rc: str, status: str, reason: str) -> None:
    from vmjobs.guest import JobFiles, collect
    from vmjobs.jobs import JobState

    files = JobFiles(tmp_path)
    make_disk(files.output_disk, header(rc, status), b"")
    verdict = collect(files, "h1")
    assert (verdict.state, verdict.exit_code) == (JobState.FAILED, None)  # exit 125
    assert verdict.reason.startswith(reason)
