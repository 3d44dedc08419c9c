"""docs/isolation.md, checked on a running guest: the QEMU process as the kernel sees it
(seccomp, cpus, uid, mount namespace, cgroup), the domain libvirt runs (DAC label, devices)
and the job's files in the spool (owners and modes). Real libvirtd, real guest (TCG).

    VMJOBS_TEST_SPOOL=/var/tmp/vmjobs-test-spool flock /tmp/vmjobs-guest.lock \\
        python -m pytest tests/guest/test_isolation.py
"""

from __future__ import annotations

import os
import signal
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from tests.guest.conftest import URI, Env
from tests.guest.test_run import assert_nothing_left
from vmjobs.units import parse_cpu_list as parse_cpu_spec

SECCOMP_FILTER = "2"  # /proc/PID/status "Seccomp:": 0 off, 1 strict, 2 filter


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def dac_label(conn: libvirt.virConnect, virt_type: str) -> tuple[int, int]:
    """The uid:gid libvirt runs QEMU as, from the host's capabilities (its DAC base label)."""
    caps = ET.fromstring(conn.getCapabilities())
    for model in caps.iter("secmodel"):
        if model.findtext("model") == "dac":
            for label in model.iter("baselabel"):
                if label.get("type") == virt_type:
                    uid, gid = (label.text or "").split(":")
                    return int(uid.lstrip("+")), int(gid.lstrip("+"))
    raise AssertionError("libvirt reports no DAC base label")


def test_running_qemu_is_confined_and_its_files_are_private(guest_env: Env) -> None:
    proc = guest_env.popen("run", "--cpus", "1", "--mem", "256M", "--env", "SECRET=s3cr3t",
                           "--", "sh", "-c", "echo ready; sleep 30")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        conn = libvirt.open(URI)
        try:
            [dom] = [d for d in conn.listAllDomains() if d.name().startswith("vmjob-")]
            job_dir = guest_env.spool / "jobs" / dom.name().removeprefix("vmjob-")
            live = ET.fromstring(dom.XMLDesc(0))
            pid = int(Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text())
            qemu_uid, qemu_gid = dac_label(conn, live.get("type") or "qemu")
            fields = status_fields(pid)

            # QEMU: unprivileged, seccomp-filtered, on its job's cpus, in its own mount ns
            assert qemu_uid != 0
            assert fields["Uid"].split() == [str(qemu_uid)] * 4
            assert fields["Gid"].split() == [str(qemu_gid)] * 4
            assert fields["Seccomp"] == SECCOMP_FILTER
            assert fields["NoNewPrivs"] == "1"
            emulator = live.find("cputune/emulatorpin")
            assert emulator is not None
            assert parse_cpu_spec(fields["Cpus_allowed_list"]) == \
                parse_cpu_spec(emulator.get("cpuset", ""))
            vcpupin = live.find("cputune/vcpupin")
            assert vcpupin is not None and len(parse_cpu_spec(vcpupin.get("cpuset", ""))) == 1
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            assert dom.name() in cgroups.replace("\\x2d", "-"), cgroups  # its own cgroup

            # the domain: DAC-labelled, no network, no devices beyond the list
            seclabel = live.find("seclabel[@model='dac']")
            assert seclabel is not None and seclabel.get("relabel") == "yes"
            assert seclabel.findtext("label") == f"+{qemu_uid}:+{qemu_gid}"
            devices = live.find("devices")
            assert devices is not None
            assert devices.findall("interface") == [] and devices.findall("hostdev") == []
            assert devices.findall("graphics") == [] and devices.findall("sound") == []
            assert [d.get("device") for d in devices.findall("disk")] == ["disk"]

            # the spool: the job's directory traversable only; its files QEMU's while it
            # runs (libvirt's dynamic ownership), root's otherwise; none readable by others
            for directory in (job_dir.parent, job_dir):
                st = directory.stat()
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711), directory
            owners = {p.name: (p.stat().st_uid, stat.S_IMODE(p.stat().st_mode))
                      for p in job_dir.iterdir()}
            assert owners["initrd"] == (qemu_uid, 0o600)
            assert owners["output.raw"] == (qemu_uid, 0o600)
            assert owners["domain.xml"] == (0, 0o600)
            assert owners["console.local.log"] == (0, 0o600)  # virtlogd writes it, as root
            db = guest_env.spool / "state.db"
            assert (db.stat().st_uid, stat.S_IMODE(db.stat().st_mode)) == (0, 0o600)
        finally:
            conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert_nothing_left(guest_env)
    # the guest gone, libvirt has given its files back to root
    for name in ("initrd", "output.raw"):
        st = (job_dir / name).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
