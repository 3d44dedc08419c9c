"""A guest's libvirt jobs and states: save and restore, abort, wait for a job to end.

The job-level operations built on these are `vmjobs.checkpoint` (save/restore) and the
daemon's recovery (`quiesce` before it decides which copy of a moved guest to keep).
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from vmjobs.virt import Connection, Domain, VirtError
from vmjobs.virt.domain_xml import read_metadata

# libvirt jobs that take the guest away from its host: aborting one leaves it where it was
OUTGOING = frozenset({libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE,
                      libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT})


def is_unpaused(dom: Domain) -> bool:
    """Whether the guest's state is RUNNING (not paused, not shut off); VirtError if gone."""
    return dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def live_xml(dom: Domain) -> str:
    """The guest's XML as it runs now (devices plugged or unplugged included)."""
    return dom.XMLDesc(0)


def resume(dom: Domain) -> None:
    """Let a paused guest run again; VirtError if libvirt refuses."""
    dom.resume()


def job_guests(conn: Connection) -> dict[str, bool]:
    """job id -> whether its guest is running, for every domain on `conn` whose <metadata>
    names a job (`domain_xml.read_metadata`); a domain that vanishes while we look is left out
    (it will not be running). VirtError if the domains cannot be listed."""
    found: dict[str, bool] = {}
    for dom in conn.listAllDomains():
        try:
            meta = read_metadata(dom.XMLDesc(0))
            running = bool(dom.isActive())
        except VirtError:
            continue
        if meta is not None and meta.job_id:
            found[meta.job_id] = running
    return found


def abort_job_quietly(dom: Domain) -> None:
    """Abort the guest's running libvirt job (a save, a migration); nothing if it has ended
    meanwhile (the caller learns how it ended from the job's own call)."""
    with contextlib.suppress(VirtError):
        dom.abortJob()


def save(dom: Domain, path: Path) -> None:
    """`virDomainSave` to `path`: the guest stops once its memory is in the file. VirtError if
    it fails or is aborted (the guest then runs on)."""
    dom.save(str(path))


def memory_snapshot_xml(domain_xml: str, path: Path) -> str:
    """The `<domainsnapshot>` for `snapshot_memory`: the guest's memory and device state into
    `path` (`<memory snapshot='external'>`, the save-image format `restore` reads), every disk
    of `domain_xml` left out (`snapshot='no'`: the job's only disk is its output disk, which
    the guest writes once at its end)."""
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "memory", snapshot="external", file=str(path))
    disks = ET.SubElement(snap, "disks")
    for target in ET.fromstring(domain_xml).iterfind("./devices/disk/target"):
        ET.SubElement(disks, "disk", name=target.get("dev", ""), snapshot="no")
    return ET.tostring(snap, encoding="unicode")


def snapshot_memory(dom: Domain, path: Path) -> None:
    """Write the guest's state to `path` and let it run on: an external memory snapshot
    without libvirt metadata (`VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA`: nothing is left in
    libvirt, the file is ours), which `restore` reads as it reads a save image. The guest must
    be paused by the caller (so that what it wrote before is known) and stays paused.
    VirtError if libvirt refuses or fails; a partial file may remain."""
    dom.snapshotCreateXML(memory_snapshot_xml(live_xml(dom), path),
                          libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)


def pause(dom: Domain) -> None:
    """Stop the guest's vCPUs (and its device I/O) until `resume`; VirtError if refused."""
    dom.suspend()


def saved_xml(conn: Connection, path: Path) -> str:
    """The domain XML inside a save image, with its secure parts (`VIR_DOMAIN_XML_SECURE`)."""
    return conn.saveImageGetXMLDesc(str(path), libvirt.VIR_DOMAIN_XML_SECURE)


def restore(conn: Connection, path: Path, xml: str, paused: bool = False) -> None:
    """Restore the save image at `path` as `xml` (`restoreFlags`), running — or `paused`
    (`resume` starts it: a gang's members are all restored before any runs); VirtError if
    not."""
    conn.restoreFlags(str(path), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED if paused
                      else libvirt.VIR_DOMAIN_SAVE_RUNNING)


def quiesce(dom: Domain, deadline: float) -> None:
    """Let a libvirt job that outlived the daemon end before anything is decided: a save or an
    outgoing migration is aborted (the guest resumes where it was), a restore or an incoming
    migration is waited for, until `deadline` (time.monotonic())."""
    aborted = False
    while time.monotonic() < deadline:
        try:
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return
            if not aborted and dom.jobStats().get(libvirt.VIR_DOMAIN_JOB_OPERATION) in OUTGOING:
                dom.abortJob()
                aborted = True
        except VirtError:
            return  # the domain is gone: the job ended
        time.sleep(0.2)
