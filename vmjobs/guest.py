"""One job's guest: its files in the spool, its domain, and following it until it stops.

Used by `vmjob run` and by the KVM probe; the daemon will use the same pieces.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from placement import Allocation
from vmjobs import guest_protocol
from vmjobs.errors import VmjobsError
from vmjobs.image import Image
from vmjobs.jobs import JobState, domain_name
from vmjobs.units import format_bytes
from vmjobs.virt import domain_xml
from vmjobs.virt.domain_xml import BridgeNic, DomainSpec, Hotplug, Nic, guest_nic_address

READ_CHUNK = 1 << 20  # bytes of job output read at a time


@dataclass(frozen=True)
class JobFiles:
    """Where one job's files live: one directory per job, on storage every host sees."""

    dir: Path

    @classmethod
    def of(cls, spool: Path, job_id: str) -> JobFiles:
        return cls(spool / "jobs" / job_id)

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd"

    @property
    def output_disk(self) -> Path:
        return self.dir / "output.raw"

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def domain_xml(self) -> Path:
        return self.dir / "domain.xml"

    def output(self, index: int) -> Path:
        """The job's stdout and stderr as its `index`-th guest process wrote them: each start
        of a QEMU for the job (launch, migration, restore) gets the next file, since QEMU
        writes a `pipe` chardev's file from its start (it has no append mode)."""
        return self.dir / f"output.{index}.out"

    def output_indexes(self) -> list[int]:
        """The indexes of the output files that exist, in order."""
        found = []
        for path in self.dir.glob("output.*.out"):
            middle = path.name[len("output."):-len(".out")]
            if middle.isdigit():
                found.append(int(middle))
        return sorted(found)

    def new_output(self) -> Path:
        """Create the next output file and its FIFO; return the pipe's base path for the
        domain XML (`domain_xml.output_channel`). Called before every start of a guest
        process for the job, by the one thread that starts it."""
        index = max(self.output_indexes(), default=-1) + 1
        base = self.dir / f"output.{index}"
        fifo = base.with_name(base.name + ".in")
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        # a FIFO opened read-write never reads end-of-file: the guest's input stays quiet
        # private like the job's other files (QEMU runs as root or is given it by libvirt)
        fd = os.open(self.output(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, JOB_FILE_MODE)
        os.close(fd)
        return base

    def console(self, host: str, visit: int = 0) -> Path:
        """The console log of the job's `visit`-th stay on `host` (a job that moves away and
        back gets a new file: segments are read in order, never interleaved)."""
        suffix = f".{visit}" if visit else ""
        return self.dir / f"console.{host}{suffix}.log"

    def next_console(self, ran_on: list[str], host: str) -> Path:
        """Where the console goes when the job (next) runs on `host`, given the hosts it ran
        on so far: its current segment if it stays, else a new one."""
        segments = console_segments(ran_on)
        if segments and segments[-1][0] == host:
            return self.console(*segments[-1])
        return self.console(host, sum(1 for h, _ in segments if h == host))


def console_segments(ran_on: list[str]) -> list[tuple[str, int]]:
    """(host, visit) per stay, from the hosts of the job's RUNNING events in order: repeats
    of the same host in a row (recovery, a failed move, a restore in place) are one stay."""
    segments: list[tuple[str, int]] = []
    for host in ran_on:
        if segments and segments[-1][0] == host:
            continue
        segments.append((host, sum(1 for h, _ in segments if h == host)))
    return segments


@dataclass(frozen=True)
class GuestPlan:
    """Everything needed to start one job's guest on one host."""

    job_id: str
    owner: str
    owner_uid: int
    argv: tuple[str, ...]
    env: dict[str, str]
    allocation: Allocation
    image: Image
    virt_type: str
    output_disk_mib: int
    input_dir: Path | None = None
    emulator_cpus: frozenset[int] = frozenset()
    vmjob_env: Mapping[str, str] = field(default_factory=dict)  # e.g. $VMJOB_ARRAY_INDEX
    hotplug: Hotplug | None = None  # room to grow live (`vmjob resize`); None: fixed size
    stdin: str | None = None  # an interactive job: "pipe" | "tty" (vmjobs.console)
    console_helper: Path | None = None  # images/vmjob-console.c built, for such a job
    # a gang member (vmjobs/gangmember.py): files under /vmjob/, its gang NIC, its control port
    extra_files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)
    gang_nic: BridgeNic | None = None
    control_channel: bool = False
    # the guest's balloon reports memory use this often (s); None: no balloon device
    balloon_period_s: int | None = None


def nics_for(allocation: Allocation) -> tuple[Nic, ...]:
    return tuple(Nic(guest_nic_address(i), dev) for i, dev in enumerate(allocation.devices))


# A job's directory and files hold its argv, environment, inputs and outputs: only root
# reads them. The directories are traversable (not listable) so that QEMU, running as
# another user, reaches its own files, which libvirt's DAC driver (`dynamic_ownership`, on
# by default) hands to that user for the guest's lifetime and gives back to root after.
JOB_DIR_MODE = 0o711
JOB_FILE_MODE = 0o600


def make_job_dir(files: JobFiles) -> None:
    """Create (or re-mode) `<spool>/jobs/<id>/` and `<spool>/jobs/` with JOB_DIR_MODE."""
    for directory in (files.dir.parent, files.dir):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, JOB_DIR_MODE)


def prepare(plan: GuestPlan, files: JobFiles) -> str:
    """Write the job's initrd, output disk and domain XML (each JOB_FILE_MODE, in a
    JOB_DIR_MODE directory); return the XML."""
    make_job_dir(files)
    nics = nics_for(plan.allocation)
    guest_protocol.write_job_initrd(
        guest_protocol.JobSpec(
            job_id=plan.job_id,
            argv=plan.argv,
            env=plan.env,
            cpus=len(plan.allocation.cpus),
            memory_mib=plan.allocation.memory_mib,
            nics=tuple(str(n.guest_address) for n in nics),
            input_dir=plan.input_dir,
            vmjob_env=plan.vmjob_env,
            stdin=plan.stdin,
            console_helper=plan.console_helper,
            extra_files=plan.extra_files,
        ),
        plan.image.initrd,
        files.initrd,
    )
    guest_protocol.create_output_disk(files.output_disk, plan.output_disk_mib << 20)
    os.chmod(files.output_disk, JOB_FILE_MODE)
    output_pipe = files.new_output()
    xml = domain_xml.build(
        DomainSpec(
            name=domain_name(plan.job_id),
            job_id=plan.job_id,
            owner=plan.owner,
            owner_uid=plan.owner_uid,
            virt_type=plan.virt_type,
            allocation=plan.allocation,
            kernel=plan.image.boot_kernel,
            loader=plan.image.firmware,
            initrd=files.initrd,
            console_log=files.console(plan.allocation.host),
            output_disk=files.output_disk,
            emulator_cpus=plan.emulator_cpus,
            nics=nics,
            # every job may move: after a migration or restore its clock is set through this
            clock_channel=True,
            output_pipe=output_pipe,
            hotplug=plan.hotplug,
            input_channel=plan.stdin is not None,
            gang_nic=plan.gang_nic,
            control_channel=plan.control_channel,
            balloon_period_s=plan.balloon_period_s,
        )
    )
    fd = os.open(files.domain_xml, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOB_FILE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(xml)
    return xml


class OutputReader:
    """Reads a job's output files (`JobFiles.output`) in order, as they grow.

    File n is complete once a later file holds data (the guest process that wrote n was
    paused for good before the next one ran) or once the job's guest is gone for good
    (`final`). A later file that stays empty (a migration that failed) is skipped over.
    """

    def __init__(self, files: JobFiles) -> None:
        self.files = files
        self.index = 0
        self.offset = 0
        self.total = 0  # bytes returned so far

    def skip(self, count: int) -> None:
        """Start `count` bytes into the output (what a reader had before it reconnected);
        at the end of what exists if there is less."""
        self.total += count
        for index in self.files.output_indexes():
            size = _size(self.files.output(index))
            self.index, self.offset = index, min(count, size)
            if count <= size:
                return
            count -= size

    def read(self, final: bool = False, limit: int = READ_CHUNK) -> bytes:
        """Up to `limit` new bytes; b"" when nothing new has been written (yet)."""
        while True:
            data = _read_from(self.files.output(self.index), self.offset, limit)
            if data:
                self.offset += len(data)
                self.total += len(data)
                return data
            later = [i for i in self.files.output_indexes() if i > self.index]
            if not later:
                return b""
            if not final and all(_size(self.files.output(i)) == 0 for i in later):
                return b""  # the current guest process may still write to this file
            self.index, self.offset = later[0], 0




# How often a running job's output is looked at (`OutputGuard`): a stat per output file, and a
# statvfs of the spool when it did not grow. A second keeps that cost negligible (hundreds of
# jobs: hundreds of stats a second) while a job goes at most about one second's worth of
# output past its `output_limit` (~0.6 MB under TCG here; a KVM guest writes faster) and a
# job stalled on a full spool is stopped within two seconds.
OUTPUT_CHECK_S = 1.0
# Less room than this in the spool's file system counts as full: QEMU writes the output port
# in small pieces, so a failed write leaves at most a page or two unused.
SPOOL_FULL_BYTES = 64 << 10


class OutputGuard:
    """Tells when a running job must be stopped because of its output, at most once per
    OUTPUT_CHECK_S (more frequent calls return None without touching the disk).

    - Its output files together exceed `limit_bytes` (`output_limit`; None: no limit).
    - Its output did not grow since the last check and the spool's file system is full.
      QEMU cannot write the output port's file (ENOSPC) and retries at once, forever: the
      job blocks in its next write while QEMU spins a core, both holding their cpus with
      nobody to notice. (A job that writes nothing while the spool is full is stopped too:
      its result could not be written either.)

    One per job; used by the daemon's output thread and by a direct `vmjob run`."""

    def __init__(self, files: JobFiles, limit_bytes: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self.limit_bytes = limit_bytes
        self.clock = clock
        self.next_check = clock() + OUTPUT_CHECK_S
        self.last_size: int | None = None

    def check(self) -> str | None:
        """Why the job must stop now (one line for its end), or None."""
        now = self.clock()
        if now < self.next_check:
            return None
        self.next_check = now + OUTPUT_CHECK_S
        size = output_size(self.files)
        if self.limit_bytes is not None and size > self.limit_bytes:
            return (f"output exceeded output_limit {format_bytes(self.limit_bytes)}; "
                    "guest stopped")
        stalled = size == self.last_size
        self.last_size = size
        if stalled:
            free = spool_free_bytes(self.files.dir)
            if free < SPOOL_FULL_BYTES:
                return (f"output could not be written: the spool's file system is full "
                        f"({free} bytes free at {self.files.dir}); guest stopped")
        return None


def output_size(files: JobFiles) -> int:
    """Bytes of output the job's guest processes wrote so far, all files together."""
    return sum(_size(files.output(i)) for i in files.output_indexes())


def spool_free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer (QEMU) may still write in `path`'s file system."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(limit)
    except FileNotFoundError:
        return b""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class Verdict:
    """How a stopped guest's job ended, as the store should record it."""

    state: JobState
    reason: str
    exit_code: int | None = None
    # the guest reported how its job ended (even with an output it could not deliver): the job
    # finished by itself, whatever stop was meanwhile asked for
    reported: bool = False


def collect(files: JobFiles, host: str) -> Verdict:
    """The guest has stopped: read its exit status and extract its /job/out into `files.out`.

    A job's exit status counts only with its output: an output the guest could not deliver
    (larger than the disk, a write that failed) ends the job FAILED with no exit code (the
    clients' 125), the reason naming what happened."""
    try:
        result = guest_protocol.read_output(files.output_disk, files.out)
    except (VmjobsError, OSError) as exc:
        return Verdict(JobState.FAILED, f"output refused: {exc}")
    if result.status != "ok" or result.exit_code is None:
        return Verdict(JobState.FAILED, no_result(result, files.console(host)),
                       reported=result.exit_code is not None)
    state = JobState.COMPLETED if result.exit_code == 0 else JobState.FAILED
    return Verdict(state, f"exit status {result.exit_code}", result.exit_code, reported=True)


def no_result(result: guest_protocol.GuestResult, console: Path) -> str:
    """Why a guest's result is not the job's result, in one line."""
    ran = "" if result.exit_code is None else \
        f" (the job itself exited with status {result.exit_code})"
    if result.status == "overflow":
        if result.needed is not None:
            sizes = (f"/job/out needs {result.needed} bytes as a tar and the output disk "
                     f"holds {result.available}")
        else:
            sizes = "/job/out is larger than the output disk"
        return f"output refused: {sizes}; raise output_disk_size{ran}"
    if result.status == "error":
        return (f"the guest could not write /job/out to its output disk{ran}; console log: "
                f"{console}")
    return (f"guest stopped without reporting an exit status ({result.status}); "
            f"console log: {console}")
