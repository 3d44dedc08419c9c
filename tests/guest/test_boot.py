"""The trimmed cold boot on real guests: vmlinux through PVH, qboot, the trimmed command line,
the NIC drivers only for jobs with NICs. Speed is in bench/boot.py, not here."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from tests.guest.conftest import Env, our_domains
from vmjobs.image import resolve_image
from vmjobs.jobs import JobState
from vmjobs.store import Store

pytestmark = pytest.mark.guest

PROBE = ('echo out; echo err >&2; cat /proc/cmdline; ls /sys/class/net | tr "\\n" " "; echo; '
         '[ -d /sys/module/virtio_net ] && echo virtio_net-loaded; exit 7')


def job_id_of(stderr: str) -> str:
    match = re.search(r"job (\S+) on ", stderr)
    assert match, stderr
    return match.group(1)


def domain_of(env: Env, job_id: str) -> ET.Element:
    return ET.parse(env.spool / "jobs" / job_id / "domain.xml").getroot()


def ended_and_freed(env: Env, job_id: str) -> tuple[JobState, int | None]:
    store = Store(env.spool / "state.db")
    try:
        record = store.job(job_id)
        assert record is not None
        assert store.reservation_count() == 0  # freed once QEMU was gone
        return record.state, record.exit_code
    finally:
        store.close()


def test_trimmed_boot_runs_a_job_with_output_and_exit_code(guest_env: Env) -> None:
    image = resolve_image(guest_env.spool, "default")
    # this machine's Debian kernel has CONFIG_PVH and qemu-system-data ships qboot
    assert image.vmlinux is not None and image.firmware is not None
    result = guest_env.vmjob("run", "--", "sh", "-c", PROBE)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["out", "err"]
    assert {"cryptomgr.notests", "no_timer_check"} <= set(lines[2].split())
    assert lines[3].split() == ["lo"]  # no NIC, and no NIC driver loaded for nothing
    assert "virtio_net-loaded" not in lines
    job_id = job_id_of(result.stderr)
    root = domain_of(guest_env, job_id)
    assert root.findtext("os/kernel") == str(image.vmlinux)
    loader = root.find("os/loader")
    assert loader is not None and loader.get("type") == "rom"
    assert loader.text == str(image.firmware)
    # the end was recorded (at the power-off) and the cores freed after QEMU went
    assert ended_and_freed(guest_env, job_id) == (JobState.FAILED, 7)
    assert f"vmjob-{job_id}" not in our_domains()


def test_a_job_with_an_emulated_nic_still_gets_its_driver(guest_env: Env) -> None:
    result = guest_env.vmjob("run", "--nics", "1", "--", "sh", "-c", PROBE)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[3].split() == ["eth0", "lo"]  # virtio_net bound the NIC at $NIC0
    assert "virtio_net-loaded" in lines
    job_id = job_id_of(result.stderr)
    assert ended_and_freed(guest_env, job_id) == (JobState.FAILED, 7)
    assert f"vmjob-{job_id}" not in our_domains()
