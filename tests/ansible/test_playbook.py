"""ansible/site.yml applied to this machine for real (connection: local), then a job through
the daemon it set up, a second run that changes nothing, the kernel and vfio parts in check
mode, and ansible-lint.

What runs for real: both roles' package, /dev/kvm, libvirt, spool, install (a venv made from
/usr/bin/python3 with vmjobs from a wheel of this checkout), config (validated by
`vmjob hosts --check`), image and daemon tasks (the plain-init path: start-stop-daemon with a
pid file, since this machine has no systemd). libvirtd already runs here and is left alone.
What runs in check mode only: the kernel command line (grub drop-in), hugepages at boot, the
IOMMU and vfio-pci parts; nothing of them is written. Every path that would collide with the
machine or other tests (config, socket, spool, venv, pid file, unit, udev rule, libvirt
config files, grub and modprobe drop-ins) is one of the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
# Persistent, like the guest tests' spool: the guest image is built once and reused.
SPOOL = Path(os.environ.get("VMJOBS_ANSIBLE_SPOOL", "/var/tmp/vmjobs-ansible-spool"))
ADMIN_GROUP = "vmjobs-ansible-test"

pytestmark = [pytest.mark.ansible, pytest.mark.guest]


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        message = f"{path} is missing: install the provision extra (scripts/setup.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Site:
    work: Path
    inventory: Path
    extra_vars: Path
    config: Path
    socket: Path
    venv: Path
    pid_file: Path

    def playbook(self, *args: str, timeout: float = 900) -> dict[str, Any]:
        """Run site.yml; the JSON callback's report ("plays", "stats")."""
        env = dict(clean_env(), ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
                   ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
                   ANSIBLE_LOCAL_TEMP=str(self.work / "ansible-tmp"),
                   ANSIBLE_REMOTE_TEMP=str(self.work / "ansible-tmp"))
        done = subprocess.run(
            [str(tool("ansible-playbook")), "-i", str(self.inventory), "-e", f"@{self.extra_vars}",
             *args, str(ANSIBLE_DIR / "site.yml")],
            capture_output=True, text=True, timeout=timeout, cwd=ANSIBLE_DIR, env=env)
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"ansible-playbook rc {done.returncode}, no JSON report:\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        report["rc"] = done.returncode
        return report

    def vmjob(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        # the vmjob the playbook installed, not this checkout's
        return subprocess.run([str(self.venv / "bin" / "vmjob"), "--config", str(self.config),
                               *args], capture_output=True, text=True, timeout=timeout,
                              env=clean_env(), cwd="/")


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: what runs must be the installed package, not the
    checkout the tests were started from."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def stats(report: dict[str, Any]) -> dict[str, int]:
    return report["stats"]["local"]


def task_results(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [task["hosts"]["local"] for play in report["plays"] for task in play["tasks"]
            if task["task"]["name"].split(" : ")[-1] == name and "local" in task["hosts"]]


def failures(report: dict[str, Any]) -> list[str]:
    return [f"{task['task']['name']}: {result.get('msg')}"
            for play in report["plays"] for task in play["tasks"]
            for result in task["hosts"].values() if result.get("failed")]


def stop_daemon(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tool("ansible-playbook")
    work = tmp_path_factory.mktemp("ansible")
    SPOOL.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs", "probe", "uploads"):
        shutil.rmtree(SPOOL / stale, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (SPOOL / f"state.db{suffix}").unlink(missing_ok=True)
    # An offline wheelhouse of this checkout and its dependencies: the role installs
    # vmjobs==<version> from it with --no-index, as an admin would from their own mirror.
    wheels = work / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels),
                            str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    etc_libvirt = work / "etc-libvirt"  # the role edits copies, never the running libvirtd's
    etc_libvirt.mkdir()
    for name in ("qemu.conf", "libvirtd.conf"):
        shutil.copy(Path("/etc/libvirt") / name, etc_libvirt / name)
    for sub in ("grub.d", "modprobe.d", "modules-load.d", "udev"):
        (work / sub).mkdir()
    site = Site(work=work, inventory=work / "inventory.yml", extra_vars=work / "vars.yml",
                config=work / "etc" / "config.yaml", socket=work / "vmjobs.sock",
                venv=work / "venv", pid_file=work / "vmjobd.pid")
    site.inventory.write_text(yaml.safe_dump({"all": {
        "hosts": {"local": {"ansible_connection": "local", "ansible_become": False,
                            "ansible_python_interpreter": "/usr/bin/python3",
                            "vmjobs_compute__libvirt_uri": "qemu:///system",
                            "vmjobs_compute__reserved_cpus": "",
                            "vmjobs_compute__labels": {"provisioned-by": "ansible"}}},
        "children": {"controller": {"hosts": {"local": {}}},
                     "compute": {"hosts": {"local": {}}}},
    }}))
    site.extra_vars.write_text(yaml.safe_dump({
        "vmjobs_compute__virt_type": "qemu",  # nested KVM cannot run guests here
        "vmjobs_compute__libvirt_config_dir": str(etc_libvirt),
        "vmjobs_compute__udev_rules_dir": str(work / "udev"),
        "vmjobs_compute__spool": str(SPOOL),
        "vmjobs_compute__grub_dropin": str(work / "grub.d" / "vmjobs.cfg"),
        "vmjobs_compute__modprobe_dir": str(work / "modprobe.d"),
        "vmjobs_compute__modules_load_dir": str(work / "modules-load.d"),
        "vmjobs_compute__reboot_flag": str(work / "reboot-required"),
        "vmjobs_controller__venv": str(site.venv),
        "vmjobs_controller__pip_extra_args": f"--no-index --find-links {wheels}",
        "vmjobs_controller__bin_link": str(work / "bin" / "vmjob"),
        "vmjobs_controller__config_path": str(site.config),
        "vmjobs_controller__spool": str(SPOOL),
        "vmjobs_controller__socket": str(site.socket),
        "vmjobs_controller__admin_group": ADMIN_GROUP,
        "vmjobs_controller__virt_type": "qemu",
        "vmjobs_controller__service_manager": "pidfile",
        "vmjobs_controller__unit_path": str(work / "systemd" / "vmjobd.service"),
        "vmjobs_controller__pid_file": str(site.pid_file),
        "vmjobs_controller__log_file": str(work / "vmjobd.log"),
    }))
    (work / "bin").mkdir()
    (work / "systemd").mkdir()
    (work / "ansible-tmp").mkdir()
    try:
        yield site
    finally:
        stop_daemon(site.pid_file)
        subprocess.run(["groupdel", ADMIN_GROUP], capture_output=True)


@pytest.fixture(scope="module")
def first_run(site: Site) -> dict[str, Any]:
    return site.playbook("--skip-tags", "kernel,vfio")


def test_first_run_provisions_this_machine(site: Site, first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0 and stats(first_run)["failures"] == 0, failures(first_run)
    assert stats(first_run)["changed"] > 0
    # the package from the wheel, in a venv made from Debian's python
    version = subprocess.run([str(site.venv / "bin" / "python"), "-c",
                              "import sys, vmjobs; print(sys.base_prefix, vmjobs.__file__)"],
                             capture_output=True, text=True, check=True, cwd="/",
                             env=clean_env()).stdout.split()
    assert version[0] == "/usr" and version[1].startswith(str(site.venv))
    assert (site.work / "bin" / "vmjob").resolve() == (site.venv / "bin" / "vmjob").resolve()
    # the config lists this machine from the inventory and passes the daemon's own check
    checked = site.vmjob("hosts", "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    hosts = json.loads(checked.stdout)["hosts"]
    assert hosts == [{"name": "local", "uri": "qemu:///system", "pools": ["default"],
                      "reserved_cpus": [], "labels": {"provisioned-by": "ansible"},
                      "nics": []}]
    assert "migration_port_min = 49152" in (site.work / "etc-libvirt" / "qemu.conf").read_text()
    assert 'GROUP="kvm"' in (site.work / "udev" / "65-vmjobs-kvm.rules").read_text()
    unit = (site.work / "systemd" / "vmjobd.service").read_text()
    assert f"ExecStart={site.venv}/bin/vmjob --config {site.config} serve" in unit
    assert subprocess.run(["getent", "group", ADMIN_GROUP], capture_output=True).returncode == 0
    # libvirtd was running and is left as it was: the role did not start another one
    assert not task_results(first_run, "Start the one that is not running")[0].get("changed")
    # the daemon runs under start-stop-daemon with its pid file
    pid = int(site.pid_file.read_text())
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:5] == [
        str(site.venv / "bin" / "vmjob").encode(), b"--config", str(site.config).encode(),
        b"serve"]
    assert site.socket.exists()


def test_a_job_runs_through_the_provisioned_daemon(site: Site,
                                                   first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0
    submitted = site.vmjob("submit", "--cpus", "1", "--mem", "256M", "--", "sh", "-c",
                           "mkdir -p out && echo answer-$((6*7)) | tee out/answer.txt")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    waited = site.vmjob("wait", job, timeout=600)
    assert waited.returncode == 0, waited.stderr
    logs = site.vmjob("logs", job)
    assert "answer-42" in logs.stdout
    # collected by the daemon, which runs on Debian's Python 3.11.2 (no tarfile data filter)
    shown = json.loads(site.vmjob("show", job, "--json").stdout)
    assert shown["state"] == "COMPLETED" and shown["exit_code"] == 0
    assert (SPOOL / "jobs" / job / "out" / "answer.txt").read_text() == "answer-42\n"


def test_second_run_changes_nothing(site: Site, first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0
    pid = site.pid_file.read_text()
    again = site.playbook("--skip-tags", "kernel,vfio")
    assert again["rc"] == 0 and stats(again)["failures"] == 0, failures(again)
    changed = [f"{play['play']['name']} / {task['task']['name']}" for play in again["plays"]
               for task in play["tasks"] if task["hosts"].get("local", {}).get("changed")]
    assert stats(again)["changed"] == 0, changed
    assert site.pid_file.read_text() == pid  # the daemon was not restarted


def test_kernel_and_vfio_in_check_mode(site: Site, first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0
    wanted = site.work / "kernel-vars.yml"
    wanted.write_text(yaml.safe_dump({
        "vmjobs_compute__isolated_cpus": "1",
        "vmjobs_compute__hugepages_2m_per_node": 16,
        "vmjobs_compute__vfio_nics": ["0000:3b:00.0", "8086:1572"],
    }))
    report = site.playbook("--tags", "checks,kernel,vfio", "--check", "--diff",
                           "-e", f"@{wanted}")
    assert report["rc"] == 0 and stats(report)["failures"] == 0, failures(report)
    grub = task_results(report, "Write the grub drop-in")[0]
    assert grub["changed"]
    after = grub["diff"][0]["after"] if isinstance(grub["diff"], list) else grub["diff"]["after"]
    nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*")))
    assert (f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX isolcpus=1 nohz_full=1 rcu_nocbs=1 '
            f'default_hugepagesz=2M hugepagesz=2M hugepages={16 * nodes} intel_iommu=on '
            f'iommu=pt"') in after
    modprobe = task_results(report, "Load vfio-pci at boot, claiming the allowed vendor:product "
                                    "NICs")[0]
    diffs = [r["diff"] for r in modprobe["results"]]
    afters = " ".join((d[0] if isinstance(d, list) else d)["after"] for d in diffs)
    assert "options vfio-pci ids=8086:1572" in afters and "vfio-pci\n" in afters
    # no IOMMU on this machine: binding waits for the reboot the role flags, never fails
    waits = task_results(report, "Say that binding waits for the reboot")[0]
    assert "reboot" in waits["msg"] and "0000:3b:00.0" in waits["msg"]
    flagged = task_results(report, "Flag the reboot the kernel command line needs")
    assert flagged and flagged[0]["changed"]
    # check mode: nothing written
    for path in ("grub.d/vmjobs.cfg", "modprobe.d/vmjobs-vfio.conf",
                 "modules-load.d/vmjobs-vfio.conf", "reboot-required"):
        assert not (site.work / path).exists(), path


def test_the_nic_of_the_default_route_is_refused(site: Site, first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0
    route = subprocess.run(["ip", "-j", "route", "show", "default"], capture_output=True,
                           text=True, check=True)
    routes = json.loads(route.stdout)
    if not routes or not Path(f"/sys/class/net/{routes[0]['dev']}/device").exists():
        pytest.skip("no default route through a device NIC on this machine")
    device = Path(f"/sys/class/net/{routes[0]['dev']}/device")
    ids = ":".join((device / f).read_text().strip().removeprefix("0x")
                   for f in ("vendor", "device"))
    wanted = site.work / "route-nic.yml"
    wanted.write_text(yaml.safe_dump({"vmjobs_compute__vfio_nics": [ids]}))
    report = site.playbook("--tags", "checks", "--check", "-e", f"@{wanted}")
    assert report["rc"] != 0
    refused = task_results(report, "Refuse to take the NIC that carries the default route")[0]
    assert refused["failed"] and "carries the default route" in refused["msg"]
    assert routes[0]["dev"] in refused["msg"]


def test_kvm_without_hardware_virtualization_is_refused(site: Site,
                                                        first_run: dict[str, Any]) -> None:
    assert first_run["rc"] == 0
    report = site.playbook("--tags", "checks", "--check", "-e", "vmjobs_compute__virt_type=kvm")
    check = task_results(report, "Require VT-x or AMD-V for KVM guests")[0]
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")]
    if any({"vmx", "svm"} & set(line.split()) for line in flags):
        assert report["rc"] == 0 and not check.get("failed")
    else:  # this machine: nested KVM without vmx; the role says what to do instead
        assert report["rc"] != 0 and check["failed"]
        assert "vmjobs_compute__virt_type: qemu" in check["msg"]


def test_ansible_lint_passes() -> None:
    done = subprocess.run([str(tool("ansible-lint")), "--offline", "--strict"],
                          capture_output=True, text=True, timeout=600, cwd=ANSIBLE_DIR,
                          env=dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
