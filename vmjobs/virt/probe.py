"""`virt_type: auto`: use KVM where it can really boot our guest, TCG elsewhere.

`/dev/kvm` existing proves little: under some nested setups KVM is offered but a stock kernel
hangs or dies with "KVM internal error" (the domain is then left *paused*, not stopped). So
`auto` boots the real image once under KVM with a short timeout and caches the verdict per
host, libvirt version and image.

One probe at a time per host, whoever asks: within a spool a file lock makes the others wait
and then read the cached verdict; across spools (several daemons, direct runs) the probe
domain has one fixed name, `vmjob-probe`, and libvirt refuses a second domain of that name on
the same host. The probe's domain is destroyed whatever happens; one found paused or stopped
is a leftover and is destroyed, one still running longer than a probe may is too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt

from placement import Allocation, NodeShare
from vmjobs import guest_protocol
from vmjobs.config import Config, HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.filelock import exclusive
from vmjobs.guest import GuestPlan, JobFiles, prepare
from vmjobs.image import Image
from vmjobs.jobs import domain_name
from vmjobs.virt import Connection, Domain, VirtError
from vmjobs.virt.conn import destroy_quietly, is_running, lookup_domain, start

PROBE_MEMORY_MIB = 128
PROBE_JOB_ID = "probe"  # the probe's domain is vmjob-probe on every host
PROBE_DOMAIN = domain_name(PROBE_JOB_ID)
GRACE_S = 30.0  # beyond its own timeout, how long another probe may keep the host
DESTROY_TRIES = 5


class ProbeFailed(VmjobsError):
    """The probe could not run (the host is held by a probe that will not go away, or its
    domain could not be destroyed); no verdict is cached."""


def kvm_offered(conn: Connection) -> bool:
    caps = ET.fromstring(conn.getCapabilities())
    return caps.find("./guest/arch[@name='x86_64']/domain[@type='kvm']") is not None


def virt_type(config: Config, host: HostConfig, conn: Connection, image: Image,
              allocation: Allocation, note: Callable[[str], None]) -> str:
    if config.virt_type != "auto":
        return config.virt_type
    cache = cache_path(config.spool, host.name)
    key = {"uri": host.uri, "hostname": conn.getHostname(), "libvirt": conn.getLibVersion(),
           "qemu": conn.getVersion(), "image": image.id}
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    with exclusive(cache.with_suffix(".lock")):
        cached = _cached(cache, key)  # probed by whoever held the lock before us
        if cached is not None:
            return cached
        if not kvm_offered(conn):
            result, why = "qemu", "libvirt offers no KVM domains"
        else:
            note(f"checking once whether KVM can boot guests on {host.name} "
                 f"(up to {config.kvm_probe_timeout_s:g}s)...")
            started = time.monotonic()
            ok = probe_boot(config, conn, image, allocation)
            result = "kvm" if ok else "qemu"
            why = (f"KVM probe boot {'succeeded' if ok else 'failed'} in "
                   f"{time.monotonic() - started:.1f}s")
        note(f"{host.name}: using virt_type {result} ({why})")
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False) as tmp:
            json.dump({"key": key, "virt_type": result, "why": why, "time": time.time()}, tmp)
        os.replace(tmp.name, cache)
        return result


def _cached(cache: Path, key: dict[str, object]) -> str | None:
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["virt_type"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def probe_boot(config: Config, conn: Connection, image: Image,
               allocation: Allocation) -> bool:
    """Boot the image under KVM on one of the job's own cpus and run `true`.

    Raises ProbeFailed when the host stays held by another probe or the probe's domain
    cannot be destroyed."""
    cpu = allocation.cpus[0]
    node = next(s.node for s in allocation.nodes if cpu in s.cpus)
    probe_alloc = Allocation(host=allocation.host, cpus=(cpu,), memory_mib=PROBE_MEMORY_MIB,
                             nodes=(NodeShare(node=node, cpus=(cpu,),
                                              memory_mib=PROBE_MEMORY_MIB),))
    files = JobFiles(config.spool / "probe" / f"run-{allocation.host}")
    dom = None
    try:
        shutil.rmtree(files.dir, ignore_errors=True)
        xml = prepare(
            GuestPlan(job_id=PROBE_JOB_ID, owner="vmjob", owner_uid=0, argv=("true",), env={},
                      allocation=probe_alloc, image=image, virt_type="kvm",
                      output_disk_mib=1),
            files,
        )
        dom = _start_alone(conn, xml, config.kvm_probe_timeout_s + GRACE_S)
        if not _ran_to_its_end(dom, config.kvm_probe_timeout_s):
            return False
        result = guest_protocol.read_output(files.output_disk, files.out)
        return result.exit_code == 0
    except ProbeFailed:
        raise
    except (VirtError, OSError, ValueError, VmjobsError):
        return False
    finally:
        try:
            _destroy(dom)
        finally:
            shutil.rmtree(files.dir, ignore_errors=True)


def _start_alone(conn: Connection, xml: str, patience_s: float) -> Domain:
    """Start the probe domain once no other probe holds the host: a leftover (paused, or
    running beyond `patience_s`) is destroyed first."""
    deadline = time.monotonic() + patience_s
    while True:
        other = lookup_domain(conn, PROBE_DOMAIN)
        if other is not None:
            if _state(other) == libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
                time.sleep(0.2)  # another probe is at work on this host
                continue
            _destroy(other)  # paused (KVM internal error), stopped, or its owner is gone
        try:
            return start(conn, xml)
        except VirtError:
            if lookup_domain(conn, PROBE_DOMAIN) is None:
                raise  # a real failure to start under KVM
            if time.monotonic() >= deadline:
                raise ProbeFailed(f"another KVM probe keeps {PROBE_DOMAIN} on this host "
                                  f"for more than {patience_s:g}s") from None
            # another probe started between our look and our start: wait for it


def _ran_to_its_end(dom: Domain, timeout_s: float) -> bool:
    """True once the probe guest is gone; False if it pauses (KVM internal error) or is still
    there after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not is_running(dom):
            return True
        if _state(dom) == libvirt.VIR_DOMAIN_PAUSED:
            return False
        time.sleep(0.1)
    return not is_running(dom)


def _state(dom: Domain) -> int:
    try:
        return int(dom.state()[0])
    except VirtError:
        return libvirt.VIR_DOMAIN_NOSTATE


def _destroy(dom: Domain | None) -> None:
    """Destroy the probe's domain, paused or not; libvirt may refuse while another call holds
    the domain's job lock, so try a few times before saying so."""
    if dom is None:
        return
    for attempt in range(DESTROY_TRIES):
        try:
            destroy_quietly(dom)
            if not is_running(dom):
                return
        except VirtError as exc:
            if attempt == DESTROY_TRIES - 1:
                raise ProbeFailed(f"the KVM probe guest {PROBE_DOMAIN} could not be "
                                  f"destroyed ({exc.get_error_message()}); destroy it by "
                                  f"hand: virsh destroy {PROBE_DOMAIN}") from None
        time.sleep(1.0)
    raise ProbeFailed(f"the KVM probe guest {PROBE_DOMAIN} is still there after "
                      f"{DESTROY_TRIES} destroys; destroy it by hand: virsh destroy "
                      f"{PROBE_DOMAIN}")


def cache_path(spool: Path, host: str) -> Path:
    return spool / "probe" / f"{host}.json"
