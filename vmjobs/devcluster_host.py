"""The init of one dev-cluster host: runs inside the host's network namespace, in a fresh
mount and UTS namespace, and keeps them alive.

Started by `vmjobs.devcluster` as
    ip netns exec <netns> unshare --mount --uts --propagation private -- \\
        python -m vmjobs.devcluster_host --name h1 --etc DIR --ready FILE [--cgroup NAME]
it gives the host its own name, its own /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
/var/cache/libvirt (tmpfs), its own /etc/libvirt (a bind-mounted copy), and runs virtlogd and
`libvirtd --listen` in the foreground as its children. It is a child subreaper, so the QEMU
processes libvirtd daemonizes are reparented to it, not to the machine's PID 1, and are reaped.

SIGTERM stops libvirtd and virtlogd, kills the guests left (as a host losing power would),
then the init exits; once the last process of the mount namespace is gone the kernel drops its
mounts. SIGUSR1 starts libvirtd (and virtlogd) again if they are not running. Everything is
argv lists, never a shell string.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PRIVATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
SUBDIRS = ("/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu", "/var/log/libvirt/qemu",
           "/run/libvirt/qemu")
CAPS_CACHE = Path("/var/cache/libvirt/qemu/capabilities")
PR_SET_CHILD_SUBREAPER = 36
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True)


def _subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def join_cgroups(name: str) -> None:
    """Move this process into `<controller>/<name>` of every cgroup v1 hierarchy.

    libvirt (without systemd) puts a domain's cgroup under its own: hosts sharing one kernel
    would otherwise all use /machine/qemu-<id>-<name>, and the source and destination of a
    migration (same name, often the same id) would share and then delete one cgroup.
    """
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        procs = hierarchy / "cgroup.procs"
        if not procs.exists():
            continue
        group = hierarchy / name
        group.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # a new cpuset is empty: it must be given cpus and memory nodes before use
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (group / knob).write_text((hierarchy / knob).read_text())
        (group / "cgroup.procs").write_text(str(os.getpid()))


def setup_namespace(name: str, etc: Path) -> None:
    socket.sethostname(name)
    cached = {p.name: p.read_bytes() for p in CAPS_CACHE.glob("*.xml")} if CAPS_CACHE.is_dir() \
        else {}
    for directory in PRIVATE_DIRS:
        Path(directory).mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", directory)
    for directory in SUBDIRS:
        Path(directory).mkdir(parents=True, exist_ok=True)
    # The machine's QEMU capabilities cache is valid here too (same binary, same kernel):
    # starting from it saves each host a QEMU probe of several seconds.
    if cached:
        CAPS_CACHE.mkdir(parents=True, exist_ok=True)
        for file_name, data in cached.items():
            (CAPS_CACHE / file_name).write_bytes(data)
    # QEMU runs as libvirt-qemu and writes here
    for directory in ("/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu"):
        shutil.chown(directory, *_qemu_owner())
    _run("mount", "--bind", str(etc), "/etc/libvirt")


def _qemu_owner() -> tuple[str, str]:
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
        return "libvirt-qemu", "kvm"
    except KeyError:
        return "root", "root"


SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1}


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class Daemons:
    """virtlogd and libvirtd, children of this init; libvirtd can be restarted (SIGUSR1)."""

    def __init__(self, ready: Path) -> None:
        self.ready = ready
        self.logd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.logd is None or self.logd.poll() is not None:
            Path("/run/libvirt/virtlogd-sock").unlink(missing_ok=True)
            self.logd = subprocess.Popen(["virtlogd", "-p", "/run/libvirt/virtlogd.pid"],
                                         preexec_fn=_unblock)
            # virtlogd must own its socket before libvirtd starts a guest
            for _ in range(100):
                if Path("/run/libvirt/virtlogd-sock").exists():
                    break
                time.sleep(0.05)
        if self.libvirtd is None or self.libvirtd.poll() is not None:
            self.libvirtd = subprocess.Popen(
                ["libvirtd", "--listen", "-p", "/run/libvirt/libvirtd.pid"], preexec_fn=_unblock)
        tmp = self.ready.with_name(self.ready.name + ".tmp")
        tmp.write_text(json.dumps({"init": os.getpid(), "virtlogd": self.logd.pid,
                                   "libvirtd": self.libvirtd.pid}))
        os.replace(tmp, self.ready)

    def stop(self) -> None:
        procs = [p for p in (self.libvirtd, self.logd) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _children() -> list[int]:
    """Processes whose parent is this init: guests libvirtd daemonized, reparented to us."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_guests() -> None:
    """A host that stops takes its guests with it, as a powered-off machine would."""
    for _ in range(3):
        pids = _children()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _children():
            _reap()
            time.sleep(0.05)
    _reap()


def _reap() -> None:
    # We are a subreaper: daemonized QEMUs end up here when they exit.
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmjobs.devcluster_host")
    parser.add_argument("--name", required=True)
    parser.add_argument("--etc", required=True, type=Path)
    parser.add_argument("--ready", required=True, type=Path)
    parser.add_argument("--cgroup", default=None)
    args = parser.parse_args(argv)

    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _subreaper()
    if args.cgroup:
        join_cgroups(args.cgroup)
    setup_namespace(args.name, args.etc)
    daemons = Daemons(args.ready)
    daemons.start()
    while True:
        info = signal.sigtimedwait(SIGNALS, 5.0)
        if info is None or info.si_signo == signal.SIGCHLD:
            # Popen objects reap their own child on poll(); everything else is reaped here
            for proc in (daemons.libvirtd, daemons.logd):
                if proc is not None:
                    proc.poll()
            _reap()
        elif info.si_signo == signal.SIGUSR1:
            daemons.start()
        else:
            break
    daemons.stop()
    kill_guests()
    print(f"devcluster host {args.name}: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
