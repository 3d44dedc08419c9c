"""`virt_type: auto`: use KVM where it can really boot our guest, TCG elsewhere.

`/dev/kvm` existing proves little: under some nested setups KVM is offered but a stock kernel
hangs or dies with "KVM internal error". So `auto` boots the real image once under KVM with a
short timeout and caches the verdict per host, libvirt version and image.
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
from vmjobs.guest import GuestPlan, JobFiles, prepare, start, wait_stopped
from vmjobs.hostconn import destroy_quietly
from vmjobs.image import Image

PROBE_MEMORY_MIB = 128


def kvm_offered(conn: libvirt.virConnect) -> bool:
    caps = ET.fromstring(conn.getCapabilities())
    return caps.find("./guest/arch[@name='x86_64']/domain[@type='kvm']") is not None


def virt_type(config: Config, host: HostConfig, conn: libvirt.virConnect, image: Image,
              allocation: Allocation, note: Callable[[str], None]) -> str:
    if config.virt_type != "auto":
        return config.virt_type
    cache = cache_path(config.spool, host.name)
    key = {"uri": host.uri, "hostname": conn.getHostname(), "libvirt": conn.getLibVersion(),
           "qemu": conn.getVersion(), "image": image.id}
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["virt_type"])
    except (OSError, ValueError, KeyError):
        pass
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
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False) as tmp:
        json.dump({"key": key, "virt_type": result, "why": why, "time": time.time()}, tmp)
    os.replace(tmp.name, cache)
    return result


def probe_boot(config: Config, conn: libvirt.virConnect, image: Image,
               allocation: Allocation) -> bool:
    """Boot the image under KVM on one of the job's own cpus and run `true`."""
    cpu = allocation.cpus[0]
    node = next(s.node for s in allocation.nodes if cpu in s.cpus)
    probe_alloc = Allocation(host=allocation.host, cpus=(cpu,), memory_mib=PROBE_MEMORY_MIB,
                             nodes=(NodeShare(node=node, cpus=(cpu,),
                                              memory_mib=PROBE_MEMORY_MIB),))
    probe_id = f"probe-{os.urandom(3).hex()}"
    files = JobFiles(config.spool / "probe" / probe_id)
    dom = None
    try:
        xml = prepare(
            GuestPlan(job_id=probe_id, owner="vmjob", owner_uid=0, argv=("true",), env={},
                      allocation=probe_alloc, image=image, virt_type="kvm",
                      output_disk_mib=1),
            files,
        )
        dom = start(conn, xml)
        if not wait_stopped(dom, config.kvm_probe_timeout_s):
            return False
        result = guest_protocol.read_output(files.output_disk, files.out)
        return result.exit_code == 0
    except (libvirt.libvirtError, OSError, ValueError, VmjobsError):
        return False
    finally:
        destroy_quietly(dom)
        shutil.rmtree(files.dir, ignore_errors=True)


def cache_path(spool: Path, host: str) -> Path:
    return spool / "probe" / f"{host}.json"
