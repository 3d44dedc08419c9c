"""A second compute host on this machine that can be stopped like a machine that dies.

`python -m tests.daemon.farhost DIR` runs as PID 1 of a new PID + mount namespace
(`unshare --pid --fork --mount --mount-proc`): private tmpfs for libvirt's run, state, log and
cache directories, a copy of /etc/libvirt whose libvirtd puts its sockets in DIR/sock (the one
thing shared with the machine, so the daemon reaches it as
qemu+unix:///system?socket=DIR/sock/libvirt-sock), and virtlogd + libvirtd as children.
SIGKILL to this PID 1 makes the kernel kill everything in the namespace — libvirtd and every
QEMU it started — at once: the host is gone, as in a power loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

PRIVATE = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
CAPS = Path("/var/cache/libvirt/qemu/capabilities")


def uri(directory: Path) -> str:
    return f"qemu+unix:///system?socket={directory}/sock/libvirt-sock"


def start(directory: Path, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """Start the host; returns the `unshare` process (its only child is the host's PID 1)."""
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "sock").mkdir(parents=True)
    log = (directory / "host.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private",
         sys.executable, "-m", "tests.daemon.farhost", str(directory)],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
    )
    deadline = time.monotonic() + timeout
    while not (directory / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill(proc)
            raise RuntimeError(f"far host did not start:\n{(directory / 'host.log').read_text()}")
        time.sleep(0.05)
    return proc


def init_pid(proc: subprocess.Popen[bytes]) -> int:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0])


def kill(proc: subprocess.Popen[bytes]) -> None:
    """Power the host off: SIGKILL its PID 1 (the kernel kills the namespace), reap unshare."""
    if proc.poll() is None:
        try:
            os.kill(init_pid(proc), 9)
        except (OSError, IndexError, ValueError):
            proc.kill()
        proc.wait(timeout=30)


def libvirtd_pid(proc: subprocess.Popen[bytes]) -> int:
    """The host's libvirtd (a child of its PID 1)."""
    init = init_pid(proc)
    for child in Path(f"/proc/{init}/task/{init}/children").read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "libvirtd":
                return int(child)
    raise RuntimeError("the far host runs no libvirtd")


def disturb_libvirtd(proc: subprocess.Popen[bytes], directory: Path, how: str,
                     stall_s: float = 15.0, timeout: float = 60.0) -> float:
    """Do to the host's libvirtd what upgrades and hangs do, its guests left running:
    `term` (a graceful stop, then a new libvirtd), `kill` (kill -9, then a new one) or `stop`
    (SIGSTOP for `stall_s`, then SIGCONT). Returns time.time() when libvirtd answers again."""
    pid = libvirtd_pid(proc)
    if how == "stop":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(stall_s)
        os.kill(pid, signal.SIGCONT)
        return time.time()
    sock = directory / "sock" / "libvirt-sock"
    os.kill(pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():  # PID 1 of the namespace reaps it
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd {pid} did not exit after SIG{how.upper()}")
        time.sleep(0.05)
    sock.unlink(missing_ok=True)
    # a new libvirtd in the host's namespaces; it daemonizes, and PID 1 there adopts it
    subprocess.run(["nsenter", "--target", str(init_pid(proc)), "--mount", "--pid", "--",
                    "libvirtd", "-d", "-p", "/run/libvirt/libvirtd.pid"], check=True,
                   timeout=timeout)
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the new libvirtd did not start")
        time.sleep(0.05)
    return time.time()


def _main(directory: Path) -> None:
    caps = {p.name: p.read_bytes() for p in CAPS.glob("*.xml")} if CAPS.is_dir() else {}
    etc = directory / "etc"
    shutil.copytree("/etc/libvirt", etc)
    with (etc / "libvirtd.conf").open("a") as conf:
        conf.write(f'\nunix_sock_dir = "{directory}/sock"\nhost_uuid = "{uuid.uuid4()}"\n')
    for path in PRIVATE:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)
    for path in ("/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu", "/var/log/libvirt/qemu",
                 "/run/libvirt/qemu"):
        Path(path).mkdir(parents=True, exist_ok=True)
    if caps:  # the machine's QEMU probe is valid here too: saves seconds at start
        CAPS.mkdir(parents=True, exist_ok=True)
        for name, data in caps.items():
            (CAPS / name).write_bytes(data)
    for path in ("/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu"):
        with contextlib.suppress(LookupError, OSError):
            shutil.chown(path, "libvirt-qemu", "kvm")
    subprocess.run(["mount", "--bind", str(etc), "/etc/libvirt"], check=True)
    subprocess.Popen(["virtlogd", "-p", "/run/libvirt/virtlogd.pid"])
    while not Path("/run/libvirt/virtlogd-sock").exists():
        time.sleep(0.05)
    subprocess.Popen(["libvirtd", "-p", "/run/libvirt/libvirtd.pid"])
    while not (directory / "sock" / "libvirt-sock").exists():
        time.sleep(0.05)
    (directory / "ready").write_text(str(os.getpid()))
    while True:  # PID 1: reap whatever ends here
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
