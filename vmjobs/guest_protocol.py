"""The host side of the guest protocol: what goes into a job's guest and what comes back.

In:  the base initramfs followed by a per-job gzip newc archive holding
     /vmjob/argv/<i>    one file per argument, exact bytes
     /vmjob/env/<NAME>  one file per environment variable, its value
     /job/...           the --input directory: the job's working directory
Out: the job's stdout and stderr on the virtio port org.vmjobs.output.0 (a file in the spool,
     `guest.OutputReader`); the serial console (kernel and init messages, the job between two
     marker lines); and a raw output disk: a 512-byte header
     `VMJOB-OUT 1 <rc|-> <ok|overflow|error>[ <needed> <available>]\\n` (the sizes in bytes,
     after `overflow` only: the tar of /job/out and the disk's room) padded with NULs, then
     from byte 512 an uncompressed tar of /job/out. The guest is untrusted, so is all of this.

The guest side is `images/init`; docs/architecture.md ("Decisions") says why it is so.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from vmjobs.console import STDIN_MODES
from vmjobs.cpio import Entry, write_gzip_newc
from vmjobs.errors import UnsafeOutput, UsageError, VmjobsError
from vmjobs.safetar import extract_data, member_refusal, relative_path

HEADER_SIZE = 512
HEADER_RE = re.compile(rb"VMJOB-OUT 1 (0|[1-9][0-9]{0,2}|-) (ok|overflow|error)"
                       rb"(?: (0|[1-9][0-9]{0,18}) (0|[1-9][0-9]{0,18}))?\n\0*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
# Names the protocol sets itself; a user --env may not shadow them.
RESERVED_ENV_RE = re.compile(r"VMJOB_[A-Za-z0-9_]*|NIC[0-9]+")

# Printed by the init on lines of their own around the job's output. The job id makes a
# collision with ordinary output practically impossible; a job that prints them on purpose
# only confuses its own log (the exit code that counts comes from the output disk).
BEGIN_MARKER = "@@vmjob:{job_id}:begin@@"
END_MARKER = "@@vmjob:{job_id}:end:{rc}@@"
INIT_PREFIX = "vmjob-init: "


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cpus: int
    memory_mib: int
    nics: tuple[str, ...] = ()  # guest PCI addresses -> NIC0, NIC1, ...
    input_dir: Path | None = None
    vmjob_env: Mapping[str, str] = field(default_factory=dict)  # VMJOB_* set by vmjob (arrays)
    # an interactive job: "pipe" | "tty" (vmjobs.console), and the guest helper that feeds
    # its stdin from the input port (images/vmjob-console.c, built by vmjobs.cbuild)
    stdin: str | None = None
    console_helper: Path | None = None
    # files vmjob adds under /vmjob/ (a gang member's /vmjob/net/*, /vmjob/bin/vmjob-ctl):
    # path relative to / -> (bytes, mode)
    extra_files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestResult:
    exit_code: int | None  # None: the guest never reported one
    status: str  # ok | overflow | error | missing
    files: int
    bytes: int
    needed: int | None = None  # overflow: bytes /job/out needs as a tar
    available: int | None = None  # overflow: bytes the output disk holds


# ---------------------------------------------------------------- into the guest


def job_env(spec: JobSpec) -> dict[str, str]:
    """The job's whole environment as the guest will export it (after PATH, HOME, TERM)."""
    env = {"VMJOB_ID": spec.job_id, "VMJOB_CPUS": str(spec.cpus),
           "VMJOB_MEM": str(spec.memory_mib)}
    env.update({f"NIC{i}": address for i, address in enumerate(spec.nics)})
    env.update(spec.vmjob_env)
    env.update(spec.env)
    return env


def check_spec(spec: JobSpec) -> None:
    if not JOB_ID_RE.fullmatch(spec.job_id):
        raise VmjobsError(f"bad job id {spec.job_id!r}")
    if not spec.argv:
        raise VmjobsError("no command given")
    for arg in spec.argv:
        if "\0" in arg:
            raise VmjobsError(f"command argument {arg!r} contains a NUL byte")
    for name, value in spec.env.items():
        if not ENV_NAME_RE.fullmatch(name):
            raise VmjobsError(f"--env {name!r}: a name is letters, digits and '_', "
                              "not starting with a digit")
        if RESERVED_ENV_RE.fullmatch(name):
            raise VmjobsError(f"--env {name}: VMJOB_* and NIC<n> are set by vmjob itself")
        if "\0" in value:
            raise VmjobsError(f"--env {name}: the value contains a NUL byte")
    for name, value in spec.vmjob_env.items():
        if not re.fullmatch(r"VMJOB_[A-Z_]+", name) or "\0" in value:
            raise VmjobsError(f"bad vmjob variable {name!r}")
    if spec.cpus < 1 or spec.memory_mib < 1:
        raise VmjobsError(f"bad guest size: {spec.cpus} cpus, {spec.memory_mib} MiB")
    for address in spec.nics:
        if not PCI_RE.fullmatch(address):
            raise VmjobsError(f"bad guest PCI address {address!r}")
    if spec.stdin is not None and (spec.stdin not in STDIN_MODES or spec.console_helper is None):
        raise VmjobsError(f"bad stdin mode {spec.stdin!r} (or no console helper)")


def input_entries(root: Path) -> list[Entry]:
    """The --input tree under job/: regular files and directories, modes and mtimes kept.
    Raises UsageError (exit 2: the option's value is bad) for a missing or unreadable
    directory, a symlink or a special file in it."""
    try:
        top = root.stat()
    except OSError as exc:
        raise UsageError(f"--input {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise UsageError(f"--input {root}: not a directory")
    entries: list[Entry] = []

    def walk(directory: Path, prefix: str) -> None:
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise UsageError(f"--input: cannot read {directory}: {exc.strerror}") from None
        for child in children:
            st = child.stat(follow_symlinks=False)
            name, path = f"{prefix}/{child.name}", Path(child.path)
            perm, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry.dir(name, perm, mtime))
                walk(path, name)
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry.file(name, path, perm, mtime))
            elif stat.S_ISLNK(st.st_mode):
                raise UsageError(f"--input: {path} is a symlink; only regular files and "
                                  "directories are copied into the guest")
            else:
                raise UsageError(f"--input: {path} is not a regular file or directory")

    walk(root, "job")
    return entries


def job_entries(spec: JobSpec) -> list[Entry]:
    check_spec(spec)
    entries = [Entry.dir("vmjob", 0o700), Entry.dir("vmjob/argv", 0o700),
               Entry.dir("vmjob/env", 0o700), Entry.dir("job")]
    entries += [Entry.file(f"vmjob/argv/{i}", arg.encode("utf-8", "surrogateescape"), 0o600)
                for i, arg in enumerate(spec.argv)]
    entries += [Entry.file(f"vmjob/env/{name}", value.encode("utf-8", "surrogateescape"), 0o600)
                for name, value in job_env(spec).items()]
    if spec.stdin is not None and spec.console_helper is not None:
        # the init finds /vmjob/stdin and runs the job under the helper (images/init)
        entries += [Entry.file("vmjob/stdin", spec.stdin.encode(), 0o600),
                    Entry.dir("vmjob/bin", 0o700),
                    Entry.file("vmjob/bin/vmjob-console", spec.console_helper, 0o700)]
    directories = sorted({str(Path(p).parent) for p in spec.extra_files} - {"vmjob", "."})
    entries += [Entry.dir(d, 0o755) for d in directories]
    for path, (data, mode) in sorted(spec.extra_files.items()):
        if not re.fullmatch(r"vmjob/(net|bin)/[a-z][a-z0-9-]*", path):
            raise VmjobsError(f"bad vmjob file {path!r}")
        entries.append(Entry.file(path, data, mode))
    if spec.input_dir is not None:
        entries += input_entries(spec.input_dir)
    return entries


def write_job_initrd(spec: JobSpec, base_initrd: Path, dest: Path) -> None:
    """dest = the base initramfs, then the job's own archive; the kernel unpacks both."""
    entries = job_entries(spec)  # every check happens before a byte is written
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            with base_initrd.open("rb") as base:
                shutil.copyfileobj(base, out, 1 << 20)
            # Keep the next archive 4-byte aligned; the kernel skips the NULs between them.
            out.write(b"\0" * (-out.tell() % 4))
            # Level 1: this archive is written for every job and read once.
            write_gzip_newc(entries, out, level=1)
        # mkstemp made it 0600: root's alone; libvirt hands it to QEMU's user while it runs
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_output_disk(path: Path, size_bytes: int) -> None:
    """A sparse raw disk, whole 512-byte sectors, all zeros (a zero header = no result yet).

    The header's block is written (allocated) now, so that the guest can still report its
    verdict there when the spool has filled up meanwhile. Raises OSError (ENOSPC) if even
    that does not fit."""
    if size_bytes < 2 * HEADER_SIZE:
        raise VmjobsError(f"output disk of {size_bytes} bytes is too small")
    with path.open("wb") as disk:
        disk.write(b"\0" * HEADER_SIZE)
        disk.truncate(size_bytes + -size_bytes % HEADER_SIZE)
        disk.flush()
        os.fsync(disk.fileno())


# ---------------------------------------------------------------- out of the guest: console


def begin_marker(job_id: str) -> str:
    return BEGIN_MARKER.format(job_id=job_id)


def end_marker(job_id: str, rc: int) -> str:
    return END_MARKER.format(job_id=job_id, rc=rc)


class ConsoleParser:
    """Turns console text, fed in chunks as it arrives, into the job's own output lines.

    Lines before the begin marker (kernel, init) and after the end marker are not the job's;
    the init's own messages among them are kept in `notes`. '\\r' is removed (the serial tty
    writes "\\r\\n"). The init prints a newline before the end marker so that the marker is on a
    line of its own even after a job whose output did not end with one; the one empty line
    that makes is therefore not the job's, so an empty line is held back until the next line
    shows whether the end marker follows it.
    """

    def __init__(self, job_id: str) -> None:
        self.begin = begin_marker(job_id)
        self.end_re = re.compile(re.escape(END_MARKER.format(job_id=job_id, rc="\0"))
                                 .replace("\0", "(0|[1-9][0-9]{0,2})"))
        self.exit_code: int | None = None
        self.notes: list[str] = []
        self._state = "before"  # before | job | after
        self._partial = ""
        self._held_blank = False

    @property
    def started(self) -> bool:
        return self._state != "before"

    @property
    def ended(self) -> bool:
        return self._state == "after"

    def feed(self, text: str) -> list[str]:
        lines = (self._partial + text.replace("\r", "")).split("\n")
        self._partial = lines.pop()
        out: list[str] = []
        for line in lines:
            out.extend(self._line(line))
        return out

    def finish(self) -> list[str]:
        """The console ended (guest stopped): flush what is left of the job's output."""
        out: list[str] = []
        if self._partial:
            out.extend(self._line(self._partial))
            self._partial = ""
        if self._state == "job" and self._held_blank:
            out.append("")
            self._held_blank = False
        return out

    def _line(self, line: str) -> Iterator[str]:
        if self._state == "before":
            if line == self.begin:
                self._state = "job"
            elif line.startswith(INIT_PREFIX):
                self.notes.append(line)
            return
        if self._state == "after":
            if line:
                self.notes.append(line)
            return
        match = self.end_re.fullmatch(line)
        if match:
            self._state, self.exit_code, self._held_blank = "after", int(match.group(1)), False
            return
        if self._held_blank:
            self._held_blank = False
            yield ""
        if line:
            yield line
        else:
            self._held_blank = True


@dataclass(frozen=True)
class ConsoleOutput:
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


def job_lines(console: str | Iterable[str], job_id: str) -> ConsoleOutput:
    """All of a finished console log at once: the job's lines and the exit code it printed."""
    parser = ConsoleParser(job_id)
    chunks = [console] if isinstance(console, str) else console
    lines: list[str] = []
    for chunk in chunks:
        lines += parser.feed(chunk)
    lines += parser.finish()
    return ConsoleOutput(lines, parser.exit_code, parser.notes)


# ---------------------------------------------------------------- out of the guest: disk


def parse_header(block: bytes) -> tuple[int | None, str] | None:
    """(exit code, status) from the disk's first block; None if the guest never wrote one.
    Raises UnsafeOutput for a header that is not the protocol's."""
    header = parse_header_sizes(block)
    return None if header is None else (header[0], header[1])


def parse_header_sizes(block: bytes) -> tuple[int | None, str, int | None, int | None] | None:
    """(exit code, status, needed bytes, available bytes) from the disk's first block (the
    sizes only with `overflow`, from guests that report them); None if never written."""
    if len(block) < HEADER_SIZE:
        raise UnsafeOutput(f"output disk is truncated ({len(block)} bytes, no full header)")
    if not block.strip(b"\0"):
        return None
    match = HEADER_RE.fullmatch(block)
    if not match:
        shown = block.split(b"\n")[0][:40].decode("ascii", "backslashreplace")
        raise UnsafeOutput(f"output disk header is not valid: {shown!r}")
    rc = None if match.group(1) == b"-" else int(match.group(1))
    if rc is not None and rc > 255:
        raise UnsafeOutput(f"output disk header has exit status {rc} (more than 255)")
    status = match.group(2).decode()
    if match.group(3) is None or status != "overflow":
        return rc, status, None, None
    return rc, status, int(match.group(3)), int(match.group(4))


def _check_member(member: tarfile.TarInfo) -> str | None:
    """The member's path relative to the output directory (None for "." itself); refuses
    anything that is not a plain file or directory inside it."""
    reason = member_refusal(member)
    if reason is not None:
        raise UnsafeOutput(f"output archive member {member.name!r}: {reason}")
    return relative_path(member) or None


def read_output(disk: Path, dest: Path, max_bytes: int | None = None) -> GuestResult:
    """Read the guest's verdict and extract its /job/out into `dest` (which must not exist).

    All checks run before anything is written; the extraction goes to a private directory next
    to `dest` that is renamed to `dest` only when complete. On refusal nothing is left.
    """
    with disk.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header = parse_header_sizes(handle.read(HEADER_SIZE))
        if header is None:
            return GuestResult(None, "missing", 0, 0)
        rc, status, needed, available = header
        if status != "ok":
            return GuestResult(rc, status, 0, 0, needed, available)
        limit = size - HEADER_SIZE if max_bytes is None else max_bytes
        members = _checked_members(handle, size, limit)
        files = sum(1 for m, _ in members if m.isreg())
        total = sum(m.size for m, _ in members if m.isreg())
        if dest.exists() or dest.is_symlink():
            raise VmjobsError(f"{dest} already exists; not extracting the job's output over it")
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
        try:
            _extract(handle, size, members, tmp)
            os.chmod(tmp, 0o700)  # the owner gets it through the API, nobody reads it here
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return GuestResult(rc, status, files, total)


class _Window(io.RawIOBase):
    """The disk from byte 512 on, as a file of its own. tarfile only reports a damaged first
    header when the archive starts at offset 0 of its file; elsewhere it quietly returns an
    empty archive."""

    def __init__(self, handle: BinaryIO, start: int, end: int) -> None:
        super().__init__()
        self._handle, self._start, self._end, self._pos = handle, start, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end - self._start}
        self._pos = max(0, base[whence] + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._end - self._start - self._pos))
        self._handle.seek(self._start + self._pos)
        got = self._handle.readinto(view[:want])  # type: ignore[attr-defined]
        self._pos += got
        return int(got)


def _open_tar(handle: BinaryIO, disk_size: int) -> tarfile.TarFile:
    window = io.BufferedReader(_Window(handle, HEADER_SIZE, disk_size), 1 << 16)
    # "r:" reads plain tar only: nothing is decompressed, so the disk size bounds everything.
    return tarfile.open(fileobj=window, mode="r:")


def _checked_members(handle: BinaryIO, disk_size: int,
                     limit: int) -> list[tuple[tarfile.TarInfo, str | None]]:
    members: list[tarfile.TarInfo] = []
    try:
        with _open_tar(handle, disk_size) as tar:
            while (member := tar.next()) is not None:
                members.append(member)
            # tarfile also treats a damaged header after the first as the end of the archive;
            # a tar that busybox wrote ends with zero blocks, so anything else is refused.
            assert tar.fileobj is not None
            tar.fileobj.seek(tar.offset)
            trailer = tar.fileobj.read(HEADER_SIZE)
    except (tarfile.TarError, EOFError, OSError, UnicodeError) as exc:
        # A member whose declared size runs past the disk makes tarfile fail on the next
        # header; name that member rather than the symptom.
        if members:
            _check_extent(members[-1], disk_size)
        raise UnsafeOutput(f"output archive is not a readable tar: {exc}") from None
    if not members:
        # The guest archives /job/out itself, so even an empty output has its "./" member.
        raise UnsafeOutput("output archive is empty although the header says ok")
    if trailer.strip(b"\0"):
        raise UnsafeOutput(f"output archive has a damaged header after member "
                           f"{members[-1].name!r}")
    checked = [(m, _check_member(m)) for m in members]
    total = 0
    for member, _ in checked:
        if member.isreg():
            _check_extent(member, disk_size)
            total += member.size
    if total > limit:
        raise UnsafeOutput(f"output archive holds {total} bytes, more than the {limit} allowed; "
                           "refused")
    return checked


def _check_extent(member: tarfile.TarInfo, disk_size: int) -> None:
    if member.offset_data + member.size > disk_size - HEADER_SIZE:
        raise UnsafeOutput(f"output archive member {member.name!r} declares {member.size} "
                           "bytes, more than the disk holds; refused")


def _extract(handle: BinaryIO, disk_size: int,
             members: list[tuple[tarfile.TarInfo, str | None]], dest: Path) -> None:
    keep = [m for m, rel in members if rel is not None]
    try:
        with _open_tar(handle, disk_size) as tar:
            # The checks above already refuse everything the "data" rules would; they stay as
            # a second line of defence (they also clear setuid bits and foreign owners), with
            # Python's filter where it exists (3.11.4+) and our own on Debian 12's 3.11.2.
            extract_data(tar, dest, keep)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafeOutput(f"output archive could not be extracted: {exc}") from None
