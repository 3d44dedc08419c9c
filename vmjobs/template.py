"""Warm start: a job's guest restored from a booted template instead of booted cold.

A template is one guest of a given image and shape (vCPUs, memory, guest NUMA cells, output
disk size; no NICs, no hugepages) booted until the init waits for its job on the virtio port
`org.vmjobs.job.0`, then saved with `virDomainSave` into `<spool>/templates/<key>.save`. The
key is a hash of everything the saved guest depends on (`template_inputs`): the image id, the
shape, the virt type, the kernel command line, the guest helper's source, the host's QEMU and
libvirt versions and, under KVM, the host CPU. A job then starts by restoring the template:

1. `ensure_template` finds the template for the job's key (its `<key>.json` must record the
   same inputs and the save image must describe the job's vCPUs and cells) or builds it
   again, on the job's own reserved cpus, under a lock per key;
2. `copy_save` writes the job's own copy of the save image with the job's identity (name,
   UUID, `<metadata>`) in its header: libvirt refuses a DEST XML whose name or UUID differ
   from the image's ("Target domain name ... does not match source", libvirt 9.0
   `virDomainDefCheckABIStability`), and a job is known by its domain name everywhere;
3. `job_xml` is the DEST XML: that identity plus the job's pinning and NUMA binding
   (`migration.retarget_xml`, as a checkpoint restore does), its console segment, output
   port file, output disk and job port file; libvirt's own ABI check compares it with the
   header, so nothing but identity is changed behind libvirt's back;
4. `<job dir>/job.in` gets the job's header line (the host's time and 64 fresh random bytes)
   and the same archive a cold start puts in its initramfs (`guest_protocol.job_entries`);
   the restored QEMU reads it as the input of the job port's `pipe` chardev and the guest
   sees end-of-file after it, so this works on any host that sees the spool;
5. `restoreFlags(copy, dxml, RUNNING)`; the copy is removed once restored. The init sets the
   clock and reseeds the kernel's CRNG (images/vmjob-resume.c) before the job runs.

Output, exit status and collection are the cold start's. `launch` is the one entry point:
it picks cold or warm from the config's `start` and the job's shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placement import Allocation
from vmjobs import guest_protocol
from vmjobs.cbuild import build_static, source_digest
from vmjobs.cpio import Entry, write_gzip_newc
from vmjobs.errors import VmjobsError
from vmjobs.filelock import exclusive
from vmjobs.guest import (
    JOB_FILE_MODE,
    GuestPlan,
    JobFiles,
    make_job_dir,
    prepare,
)
from vmjobs.jobs import domain_name
from vmjobs.virt import Connection, Domain, VirtError, domain_xml, domains
from vmjobs.virt.conn import destroy_quietly, is_running, lookup_domain, start
from vmjobs.virt.domain_xml import JOB_CHANNEL, DomainSpec
from vmjobs.virt.migration import retarget_xml

FORMAT = 1  # bump when a template made by older code must not be used
RESUME_SOURCE = "vmjob-resume.c"
SEED_BYTES = 64
READY_TIMEOUT_S = 120.0  # a template boot under TCG on a loaded machine takes a few seconds

# libvirt's save image header (src/qemu/qemu_saveimage.h, on-disk format version 2): magic,
# version, data_len, was_running, compressed, cookieOffset, 14 unused words; then data_len
# bytes holding the domain XML and the cookie (NUL-terminated, NUL-padded), then QEMU's
# migration stream.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")
SAVE_VERSION = 2


class TemplateError(VmjobsError):
    pass


# --------------------------------------------------------------------------- what a template is


@dataclass(frozen=True)
class Shape:
    """What of a job's guest a template fixes: vCPUs, memory, guest NUMA cells (vCPU list,
    MiB) and the output disk's size (the guest reads it once at boot)."""

    vcpus: int
    memory_mib: int
    cells: tuple[tuple[str, int], ...]
    output_disk_mib: int

    @classmethod
    def of(cls, alloc: Allocation, output_disk_mib: int) -> Shape:
        cells = tuple((domain_xml.format_cpu_list(v), mib)
                      for v, mib in domain_xml.guest_cells(alloc))
        return cls(len(alloc.cpus), alloc.memory_mib, cells, output_disk_mib)


def why_cold(alloc: Allocation) -> str | None:
    """Why a job with this allocation cannot start from a template (None: it can). NICs are
    devices a template would have to own; hugepages change the guest's memory backing."""
    if alloc.devices:
        return "the job has NICs"
    if alloc.hugepage_kib:
        return "the job uses hugepages"
    return None


def host_inputs(conn: Connection, virt_type: str) -> dict[str, Any]:
    """What of the host a saved guest depends on: QEMU's and libvirt's versions (the machine
    type and device state format) and, under KVM, the host CPU the guest saw."""
    found: dict[str, Any] = {"qemu": conn.getVersion(), "libvirt": conn.getLibVersion()}
    if virt_type == "kvm":
        cpu = ET.fromstring(conn.getCapabilities()).find("./host/cpu")
        text = ET.tostring(cpu, encoding="unicode") if cpu is not None else ""
        found["host_cpu"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return found


def template_inputs(image_id: str, shape: Shape, virt_type: str, host: dict[str, Any],
                    cmdline: str = domain_xml.CMDLINE,
                    helper: str | None = None,
                    balloon_period_s: int | None = None) -> dict[str, Any]:
    """Everything a template depends on, as JSON-able values; the key is their hash. A
    guest with a balloon (its statistics period, s) is another template than one without
    (the saved device set differs); without one the key is as before balloons existed."""
    balloon = {} if balloon_period_s is None else {"balloon_period_s": balloon_period_s}
    return {**balloon,
        "format": FORMAT, "image": image_id, "virt_type": virt_type, "cmdline": cmdline,
        "vcpus": shape.vcpus, "memory_mib": shape.memory_mib,
        "cells": [list(c) for c in shape.cells], "output_disk_mib": shape.output_disk_mib,
        "helper": helper if helper is not None else source_digest(RESUME_SOURCE),
        "host": host,
    }


def template_key(inputs: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of `inputs`."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TemplateFiles:
    dir: Path  # <spool>/templates
    key: str

    @classmethod
    def of(cls, spool: Path, key: str) -> TemplateFiles:
        return cls(spool / "templates", key)

    def path(self, suffix: str) -> Path:
        return self.dir / f"{self.key}{suffix}"

    @property
    def save(self) -> Path:
        return self.path(".save")

    @property
    def meta(self) -> Path:
        return self.path(".json")

    @property
    def initrd(self) -> Path:
        return self.path(".initrd")

    @property
    def job_pipe(self) -> Path:
        return self.path(".job")

    @property
    def domain(self) -> str:
        return domain_name(f"template-{self.key}")


def stale_reason(files: TemplateFiles, inputs: dict[str, Any],
                 conn: Connection) -> str | None:
    """Why the stored template must not be used for `inputs` (None: it may). The key is a
    hash of the inputs, but the file could be from a bug, a hand edit or a half-finished
    build: the recorded inputs and the save image's own XML are checked too."""
    try:
        recorded = json.loads(files.meta.read_text())
    except (OSError, ValueError):
        return "no template yet"
    if not files.save.exists() or not files.initrd.exists():
        return "its files are incomplete"
    if recorded.get("inputs") != inputs:
        changed = sorted(k for k in set(inputs) | set(recorded.get("inputs") or {})
                         if (recorded.get("inputs") or {}).get(k) != inputs.get(k))
        return f"it was made for a different {', '.join(changed)}"
    try:
        xml = domains.saved_xml(conn, files.save)
    except VirtError as exc:
        return f"its save image is unreadable: {exc.get_error_message()}"
    root = ET.fromstring(xml)
    vcpu, memory = root.find("vcpu"), root.find("memory")
    if vcpu is None or int(vcpu.text or 0) != inputs["vcpus"] or memory is None \
            or int(memory.text or 0) != inputs["memory_mib"] << 10:
        return "its save image has another shape"
    return None


# --------------------------------------------------------------------------- the save image


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int

    @property
    def stream_offset(self) -> int:
        return SAVE_HEADER.size + self.data_len


def read_save_header(handle: io.BufferedIOBase | Any) -> tuple[SaveHeader, str, bytes]:
    """(header, domain XML, cookie) of a libvirt save image open for reading."""
    raw = handle.read(SAVE_HEADER.size)
    if len(raw) != SAVE_HEADER.size:
        raise TemplateError("the save image is truncated")
    magic, *fields = SAVE_HEADER.unpack(raw)
    header = SaveHeader(*fields)
    if magic != SAVE_MAGIC or header.version != SAVE_VERSION or header.compressed != 0:
        raise TemplateError("not an uncompressed libvirt save image (format version 2)")
    data = handle.read(header.data_len)
    if len(data) != header.data_len or header.cookie_offset > header.data_len:
        raise TemplateError("the save image is truncated")
    xml = data[:data.index(b"\0")] if b"\0" in data else b""
    cookie = data[header.cookie_offset:].split(b"\0", 1)[0] if header.cookie_offset else b""
    return header, xml.decode(), cookie


def copy_save(template: Path, dest: Path, xml: str) -> None:
    """`dest` = the save image `template` with `xml` as its domain XML (the cookie and
    QEMU's stream unchanged, the stream at the same offset). Raises TemplateError if the XML
    does not fit the header's room (libvirt leaves 64 KiB to spare for such edits)."""
    with template.open("rb") as src:
        header, _old, cookie = read_save_header(src)
        body = xml.encode() + b"\0"
        data = body + (cookie + b"\0" if cookie else b"")
        if len(data) > header.data_len:
            raise TemplateError("the job's domain XML does not fit the save image's header")
        fields = SAVE_HEADER.pack(SAVE_MAGIC, header.version, header.data_len,
                                  header.was_running, header.compressed,
                                  len(body) if cookie else 0)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOB_FILE_MODE)
        try:
            os.write(fd, fields + data.ljust(header.data_len, b"\0"))
            size = os.fstat(src.fileno()).st_size
            offset = header.stream_offset
            while offset < size:  # in the kernel: no copy through Python
                copied = os.copy_file_range(src.fileno(), fd, size - offset, offset, offset)
                if copied == 0:
                    raise TemplateError("the save image shrank while it was copied")
                offset += copied
        finally:
            os.close(fd)


def with_identity(xml: str, name: str, job_uuid: str, metadata: ET.Element) -> str:
    """The domain `xml` renamed to `name`, with UUID `job_uuid` and `metadata` as its
    `<metadata>` (the job's id, owner and allocation)."""
    root = ET.fromstring(xml)
    for tag, text in (("name", name), ("uuid", job_uuid)):
        element = root.find(tag)
        if element is None:
            raise TemplateError(f"the template's XML has no <{tag}>")
        element.text = text
    old = root.find("metadata")
    position = list(root).index(old) if old is not None else 2
    if old is not None:
        root.remove(old)
    root.insert(position, metadata)
    return ET.tostring(root, encoding="unicode")


def job_xml(identity_xml: str, alloc: Allocation, emulator_cpus: frozenset[int],
            console_log: Path, output_pipe: Path, output_disk: Path, job_pipe: Path) -> str:
    """The DEST XML restoring a job from its template: `identity_xml` (`with_identity`) with
    the job's pinning and NUMA binding, console, output port, output disk and job port.

    The clock port's socket path is dropped so that libvirt gives each restored guest its
    own (two jobs from one template may run at once). Raises MigrationFailed when the
    allocation's vCPUs or cells differ from the template's."""
    root = ET.fromstring(retarget_xml(identity_xml, alloc, emulator_cpus, console_log,
                                      output_pipe))
    disks = root.findall("./devices/disk[@device='disk']")
    if len(disks) != 1 or disks[0].find("source") is None:
        raise TemplateError("the template does not have exactly one output disk")
    source = disks[0].find("source")
    assert source is not None
    source.set("file", str(output_disk))
    found_job_port = False
    for channel in root.findall("./devices/channel"):
        target, source = channel.find("target"), channel.find("source")
        if channel.get("type") == "unix" and source is not None:
            channel.remove(source)
        elif target is not None and target.get("name") == JOB_CHANNEL and source is not None:
            source.set("path", str(job_pipe))
            found_job_port = True
    if not found_job_port:
        raise TemplateError(f"the template has no {JOB_CHANNEL} port")
    return ET.tostring(root, encoding="unicode")


def job_input(spec: guest_protocol.JobSpec, now_ns: int, seed: bytes) -> bytes:
    """What the guest reads on its job port: the header line, then the job's archive."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the seed must be {SEED_BYTES} bytes")
    archive = io.BytesIO()
    write_gzip_newc(guest_protocol.job_entries(spec), archive, level=1)
    body = archive.getvalue()
    header = (f"VMJOB-JOB 1 {len(body)} {now_ns // 1_000_000_000} "
              f"{now_ns % 1_000_000_000} {seed.hex()}\n")
    return header.encode() + body


# --------------------------------------------------------------------------- making a template


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOB_FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _template_initrd(image_initrd: Path, helper: Path, dest: Path) -> None:
    """The image's initramfs followed by an archive holding only /vmjob/bin/vmjob-resume:
    no job, so the init waits on its job port."""
    out = io.BytesIO()
    out.write(image_initrd.read_bytes())
    out.write(b"\0" * (-out.tell() % 4))
    write_gzip_newc([Entry.dir("vmjob", 0o700), Entry.dir("vmjob/bin", 0o700),
                     Entry.file("vmjob/bin/vmjob-resume", helper.read_bytes(), 0o700)], out)
    _write_private(dest, out.getvalue())


def build_template(conn: Connection, plan: GuestPlan, files: TemplateFiles,
                   inputs: dict[str, Any], helper: Path) -> None:
    """Boot the template on the job's own cpus, wait for its init to be ready, save it.
    Raises TemplateError (nothing is left: no domain, no partial save image)."""
    files.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(files.dir, 0o711)
    for stale in (files.save, files.meta):
        stale.unlink(missing_ok=True)
    _template_initrd(plan.image.initrd, helper, files.initrd)
    output_disk = files.path(".output.raw")
    guest_protocol.create_output_disk(output_disk, plan.output_disk_mib << 20)
    os.chmod(output_disk, JOB_FILE_MODE)
    job_in, job_out = files.path(".job.in"), files.path(".job.out")
    job_in.unlink(missing_ok=True)
    os.mkfifo(job_in, 0o600)  # QEMU opens it read-write: it never delivers end-of-file
    _write_private(job_out, b"")
    output_out = files.path(".output.out")
    files.path(".output.in").unlink(missing_ok=True)
    os.mkfifo(files.path(".output.in"), 0o600)
    _write_private(output_out, b"")
    xml = domain_xml.build(DomainSpec(
        name=files.domain, job_id=f"template-{files.key}", owner="vmjobs", owner_uid=0,
        virt_type=plan.virt_type, allocation=plan.allocation, kernel=plan.image.boot_kernel,
        loader=plan.image.firmware, initrd=files.initrd,
        console_log=files.path(".console.log"), output_disk=output_disk,
        emulator_cpus=plan.emulator_cpus, clock_channel=True,
        output_pipe=files.path(".output"), job_pipe=files.job_pipe,
        balloon_period_s=plan.balloon_period_s,
    ))
    dom = None
    tmp_save = files.path(".save.tmp")
    try:
        dom = start(conn, xml)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not job_out.read_bytes().startswith(b"ready\n"):
            if not is_running(dom):
                raise TemplateError(f"the template guest stopped before it was ready; console "
                                    f"log: {files.path('.console.log')}")
            if time.monotonic() > deadline:
                raise TemplateError(f"the template guest was not ready within "
                                    f"{READY_TIMEOUT_S:g}s")
            time.sleep(0.02)
        tmp_save.unlink(missing_ok=True)
        domains.save(dom, tmp_save)  # the domain is gone once saved
        dom = None
        os.chmod(tmp_save, JOB_FILE_MODE)
        os.replace(tmp_save, files.save)
    except VirtError as exc:
        raise TemplateError(f"making the template failed: {exc.get_error_message()}") from None
    finally:
        destroy_quietly(dom)
        tmp_save.unlink(missing_ok=True)
    _write_private(files.meta, json.dumps({"inputs": inputs, "created": time.time(),
                                           "save_bytes": files.save.stat().st_size},
                                          indent=1).encode())


def ensure_template(conn: Connection, plan: GuestPlan, spool: Path,
                    note: Callable[[str], None]) -> TemplateFiles:
    """The template for `plan`'s image and shape on this host, made (again) if missing or
    stale. Raises TemplateError if it cannot be made."""
    helper = build_static(RESUME_SOURCE, spool / "templates" / "bin", "warm start", "-Os")
    inputs = template_inputs(plan.image.id, Shape.of(plan.allocation, plan.output_disk_mib),
                             plan.virt_type, host_inputs(conn, plan.virt_type),
                             balloon_period_s=plan.balloon_period_s)
    files = TemplateFiles.of(spool, template_key(inputs))
    with exclusive(files.path(".lock")):
        why = stale_reason(files, inputs, conn)
        if why is not None:
            note(f"making warm-start template {files.key} ({why})")
            started = time.monotonic()
            build_template(conn, plan, files, inputs, helper)
            note(f"template {files.key} made in {time.monotonic() - started:.1f}s "
                 f"({files.save.stat().st_size >> 20} MiB)")
    return files


# --------------------------------------------------------------------------- starting a job


def start_warm(conn: Connection, plan: GuestPlan, files: JobFiles,
               template: TemplateFiles) -> Domain:
    """Restore the job's guest from `template`; the guest then reads its job and runs it.
    The job's directory gets what a cold start writes (output disk, output file, console)
    plus `job.in`; the per-job copy of the save image is removed once restored."""
    make_job_dir(files)
    guest_protocol.create_output_disk(files.output_disk, plan.output_disk_mib << 20)
    os.chmod(files.output_disk, JOB_FILE_MODE)
    output_pipe = files.new_output()
    name = domain_name(plan.job_id)
    template_xml = domains.saved_xml(conn, template.save)
    spec = DomainSpec(name=name, job_id=plan.job_id, owner=plan.owner,
                      owner_uid=plan.owner_uid, virt_type=plan.virt_type,
                      allocation=plan.allocation, kernel=plan.image.boot_kernel,
                      initrd=template.initrd, console_log=files.console(plan.allocation.host),
                      output_disk=files.output_disk)
    identity = with_identity(template_xml, name, str(uuid.uuid4()), domain_xml.metadata(spec))
    dxml = job_xml(identity, plan.allocation, plan.emulator_cpus,
                   files.console(plan.allocation.host), output_pipe, files.output_disk,
                   files.dir / "job")
    _write_private(files.domain_xml, dxml.encode())
    copy = files.dir / "warm.save"
    copy_save(template.save, copy, identity)
    try:
        job = guest_protocol.JobSpec(
            job_id=plan.job_id, argv=plan.argv, env=plan.env, vmjob_env=plan.vmjob_env,
            cpus=len(plan.allocation.cpus),
            memory_mib=plan.allocation.memory_mib, input_dir=plan.input_dir)
        _write_private(files.dir / "job.out", b"")
        # written last, just before the restore: the time in it is the host's now
        _write_private(files.dir / "job.in",
                       job_input(job, time.time_ns(), secrets.token_bytes(SEED_BYTES)))
        domains.restore(conn, copy, dxml)
        dom = lookup_domain(conn, name)
        if dom is None:
            raise TemplateError(f"the restored guest {name} is gone at once")
        return dom
    finally:
        copy.unlink(missing_ok=True)


def launch(start_mode: str, conn: Connection, plan: GuestPlan, files: JobFiles,
           spool: Path, note: Callable[[str], None],
           starting: Callable[[str], None]) -> tuple[Domain, str]:
    """Start the job's guest, cold or warm as `start_mode` (cold | warm | auto) and the job's
    shape allow; return the domain and how it started ("cold", "warm"). `starting(how)` is
    called just before the guest is started (the caller records STARTING).

    `warm` fails the start if the template cannot be made or restored; `auto` then starts
    cold. A job with NICs or hugepages always starts cold (`why_cold`), as does an interactive
    one (`stdin`: its guest needs the input port)."""
    if start_mode != "cold":
        # a template is one shape; a resizable guest's topology (max vCPUs, virtio-mem) is
        # another; a restore cannot add devices the template was saved without (an
        # interactive job's input port, a gang member's NIC and control port)
        reason = why_cold(plan.allocation) or (
            "its guest is resizable (hotplug: true)" if plan.hotplug is not None else None) or (
            "the job is interactive (stdin)" if plan.stdin is not None else None) or (
            "a gang member's NIC and control port are not in the template"
            if plan.gang_nic is not None or plan.control_channel else None)
        if reason is not None:
            if start_mode == "warm":
                note(f"job {plan.job_id}: starting cold: {reason}")
        else:
            try:
                template = ensure_template(conn, plan, spool, note)
                starting("warm")
                return start_warm(conn, plan, files, template), "warm"
            except (VmjobsError, VirtError) as exc:
                message = exc.get_error_message() if isinstance(exc, VirtError) \
                    else str(exc)
                with contextlib.suppress(VirtError):
                    destroy_quietly(lookup_domain(conn, domain_name(plan.job_id)))
                if start_mode == "warm":
                    raise TemplateError(f"warm start failed: {message}") from None
                note(f"job {plan.job_id}: warm start failed ({message}); starting cold")
                for leftover in ("job.in", "job.out", "domain.xml", "output.raw"):
                    (files.dir / leftover).unlink(missing_ok=True)
    xml = prepare(plan, files)
    starting("cold")
    return start(conn, xml), "cold"
