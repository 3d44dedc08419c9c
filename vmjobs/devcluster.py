"""A cluster of N libvirt hosts on one machine, for tests and for trying vmjobs out.

Host `hK` is a network namespace `vmj-<cluster>-hK` (address .10+K on the cluster's /24,
joined to the root namespace by a veth on the bridge `vmjbr-<cluster>`, which holds .1) in
which `vmjobs.devcluster_host` runs in its own mount and UTS namespaces: hostname `hK`, its
own /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, its own copy of
/etc/libvirt, and its own virtlogd and `libvirtd --listen` (TCP, no auth, reachable only on
the bridge). Everything else, the spool included, is shared, as an NFS share would be.

`up` is idempotent: hosts that are healthy are kept, broken ones are rebuilt, missing ones
added, extra ones removed. `down` removes every namespace, link, process, cgroup and file it
made, found by name so that it also cleans up after a crashed `up`. State and the generated
config live in /run/vmjobs/devcluster/<cluster>/; the spool is kept (images are reused).

Every external command is an argv list; nothing is ever passed through a shell.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

import vmjobs
from vmjobs.errors import VmjobsError
from vmjobs.virt import VirtError
from vmjobs.virt.conn import open_uri

RUN_ROOT = Path("/run/vmjobs/devcluster")
SPOOL_ROOT = Path("/var/lib/vmjobs-devcluster")
DEFAULT_NAME = "dev"
DEFAULT_SUBNET = "10.231.0.0/24"
FIRST_HOST_OCTET = 10  # hK gets .10+K
MAX_HOSTS = 32
LIBVIRTD_TCP_PORT = 16509
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # interface names are at most 15 chars
Note = Callable[[str], None]


@dataclass(frozen=True)
class Layout:
    """Names and addresses of one dev cluster: everything `up` makes and `down` removes."""

    name: str
    subnet: str
    spool: Path

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def bridge(self) -> str:
        return f"vmjbr-{self.name}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def bridge_address(self) -> str:
        return str(self.network.network_address + 1)

    def netns(self, host: str) -> str:
        return f"vmj-{self.name}-{host}"

    def veth(self, host: str) -> str:
        return f"vh-{self.name}-{host}"

    def cgroup(self, host: str) -> str:
        return f"vmjobs-devcluster-{self.name}-{host}"

    def address(self, index: int) -> str:
        return str(self.network.network_address + FIRST_HOST_OCTET + index)

    def uri(self, index: int) -> str:
        return f"qemu+tcp://{self.address(index)}/system"

    def host_dir(self, host: str) -> Path:
        return self.run_dir / host

    def ready_file(self, host: str) -> Path:
        return self.host_dir(host) / "ready.json"

    def log_file(self, host: str) -> Path:
        return self.host_dir(host) / "host.log"


def host_name(index: int) -> str:
    return f"h{index}"


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    uri: str
    init_pid: int | None
    libvirtd: bool
    hostname: str | None
    domains: int | None
    problem: str | None = None

    @property
    def healthy(self) -> bool:
        return self.init_pid is not None and self.libvirtd and self.problem is None


@dataclass(frozen=True)
class ClusterStatus:
    layout: Layout
    hosts: tuple[HostStatus, ...]

    @property
    def up(self) -> bool:
        return bool(self.hosts) and all(h.healthy for h in self.hosts)


# --- checks -------------------------------------------------------------------------------------

def validate(name: str, hosts: int | None = None, subnet: str | None = None) -> None:
    if not _CLUSTER_NAME.match(name):
        raise VmjobsError(f"invalid dev cluster name {name!r}: 1-6 lowercase letters or digits, "
                          "starting with a letter")
    if hosts is not None and not 1 <= hosts <= MAX_HOSTS:
        raise VmjobsError(f"--hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
    if subnet is not None:
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise VmjobsError(f"--subnet {subnet!r}: {exc}") from None
        if net.prefixlen != 24 or not net.is_private:
            raise VmjobsError(f"--subnet {subnet!r}: must be a private /24, e.g. {DEFAULT_SUBNET}")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise VmjobsError("the dev cluster needs root (network and mount namespaces, libvirtd)")
    for tool in ("ip", "unshare", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            raise VmjobsError(f"the dev cluster needs {tool!r}, which is not on PATH")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VmjobsError(f"ip {' '.join(args)}: {proc.stderr.strip() or 'failed'}")
    return proc


def _check_subnet_free(layout: Layout) -> None:
    """Refuse a subnet that overlaps a route the machine already uses for something else."""
    routes = json.loads(_ip("-j", "-4", "route", "show").stdout or "[]")
    ours = layout.network
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("dev") == layout.bridge:
            continue
        try:
            theirs = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if theirs.overlaps(ours):
            raise VmjobsError(f"subnet {layout.subnet} overlaps {dst} on {route.get('dev')}; "
                              "choose another with --subnet")


# --- state --------------------------------------------------------------------------------------

@contextmanager
def _locked(name: str) -> Iterator[None]:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load_state(name: str) -> dict[str, object] | None:
    path = RUN_ROOT / name / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def layout_of(name: str = DEFAULT_NAME) -> Layout | None:
    state = _load_state(name)
    if state is None:
        return None
    return Layout(name=name, subnet=str(state["subnet"]), spool=Path(str(state["spool"])))


def _save_state(layout: Layout, hosts: int) -> None:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    data = {"name": layout.name, "subnet": layout.subnet, "spool": str(layout.spool),
            "hosts": hosts}
    tmp = layout.state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, layout.state_path)


def write_config(layout: Layout, hosts: int, nics: int) -> Path:
    data = {
        "spool": str(layout.spool),
        "virt_type": "qemu",
        "nic_backend": "emulated",
        # the cluster's own daemon socket: `vmjob serve` with this config must not take the
        # machine's /run/vmjobs/vmjobs.sock, and two clusters' daemons must not meet there
        "socket": str(layout.run_dir / "vmjobs.sock"),
        "hosts": [
            {
                "name": host_name(i),
                "uri": layout.uri(i),
                "labels": {"devcluster": layout.name},
                "emulated_nics": [{"name": f"enic{n}", "node": 0} for n in range(nics)],
                # gang networks: VXLAN between the hosts' eth0 addresses, devices made in the
                # host's namespace (vmjobs/gangnet.py)
                "gang_underlay": layout.address(i),
                "gang_netns": layout.netns(host_name(i)),
            }
            for i in range(1, hosts + 1)
        ],
    }
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.config_path.with_suffix(".tmp")
    tmp.write_text("# written by `vmjob devcluster up`; rewritten on every up\n"
                   + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, layout.config_path)
    return layout.config_path


# --- one host -----------------------------------------------------------------------------------

def _netns_exists(netns: str) -> bool:
    return Path("/run/netns", netns).exists()


def _link_exists(link: str) -> bool:
    return _ip("link", "show", "dev", link, check=False).returncode == 0


def _ensure_bridge(layout: Layout) -> None:
    if not _link_exists(layout.bridge):
        _ip("link", "add", layout.bridge, "type", "bridge")
    address = f"{layout.bridge_address}/{layout.network.prefixlen}"
    shown = _ip("-j", "-4", "addr", "show", "dev", layout.bridge).stdout
    present = {f"{a['local']}/{a['prefixlen']}" for link in json.loads(shown or "[]")
               for a in link.get("addr_info", [])}
    if address not in present:
        _ip("addr", "add", address, "dev", layout.bridge)
    _ip("link", "set", layout.bridge, "up")


def _libvirt_etc(layout: Layout, host: str) -> Path:
    """A copy of /etc/libvirt that makes libvirtd listen on TCP with its own host UUID."""
    etc = layout.host_dir(host) / "etc"
    if etc.exists():
        shutil.rmtree(etc)
    shutil.copytree("/etc/libvirt", etc, symlinks=True)
    conf = etc / "libvirtd.conf"
    text = conf.read_text() if conf.exists() else ""
    # A random UUID: libvirt refuses all-same-digit ones, and migration refuses equal ones.
    text += ("\n# vmjobs dev cluster host " + host + "\n"
             'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\n'
             f'host_uuid = "{uuid.uuid4()}"\n')
    conf.write_text(text)
    return etc


def _pythonpath() -> str:
    root = str(Path(vmjobs.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return f"{root}:{rest}" if rest else root


def _start_host(layout: Layout, index: int, note: Note) -> None:
    host = host_name(index)
    netns, veth = layout.netns(host), layout.veth(host)
    layout.host_dir(host).mkdir(parents=True, exist_ok=True)
    if not _netns_exists(netns):
        _ip("netns", "add", netns)
    if not _link_exists(veth):
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("link", "set", veth, "master", layout.bridge, "up")
    inner = f"{layout.address(index)}/{layout.network.prefixlen}"
    if inner not in _ip("-n", netns, "-4", "addr", "show", "dev", "eth0").stdout:
        _ip("-n", netns, "addr", "add", inner, "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    # A rebuilt host has the old address on a new veth (new MAC): the root namespace's ARP
    # entry for it would send its traffic nowhere until it went stale (~30-60 s).
    _ip("neigh", "flush", "to", layout.address(index), "dev", layout.bridge, check=False)
    etc = _libvirt_etc(layout, host)
    ready = layout.ready_file(host)
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    with open(layout.log_file(host), "ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation",
             "private", "--", sys.executable, "-m", "vmjobs.devcluster_host", "--name", host,
             "--etc", str(etc), "--ready", str(ready), "--cgroup", layout.cgroup(host)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/", env=env,
            start_new_session=True,
        )
    _wait_libvirtd(layout, index, proc)
    note(f"{host}: up at {layout.uri(index)}")


def _wait_libvirtd(layout: Layout, index: int, init: subprocess.Popen[bytes],
                   timeout_s: float = 60.0) -> None:
    host = host_name(index)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if layout.ready_file(host).exists():
            if not _port_open(layout.address(index)):
                last = f"nothing answers on TCP port {LIBVIRTD_TCP_PORT}"
            else:
                try:
                    conn = open_uri(layout.uri(index))
                except VirtError as exc:
                    last = exc.get_error_message()
                else:
                    conn.close()
                    return
        if init.poll() is not None:
            last = f"its init exited with status {init.returncode}"
            break
        time.sleep(0.2)
    tail = _tail(layout.log_file(host))
    raise VmjobsError(f"{host}: libvirtd did not answer at {layout.uri(index)} ({last}); "
                      f"log {layout.log_file(host)}: {tail}")


def _port_open(address: str, timeout_s: float = 1.0) -> bool:
    """Whether libvirtd's TCP port answers, asked with a short timeout: a SYN lost while a
    new bridge port settles would otherwise hold libvirt's own connect for minutes."""
    try:
        socket.create_connection((address, LIBVIRTD_TCP_PORT), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _init_pid(layout: Layout, host: str) -> int | None:
    """The host's init, if it runs (checked against its command line: pids are recycled)."""
    try:
        pid = int(json.loads(layout.ready_file(host).read_text())["init"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    return pid if b"vmjobs.devcluster_host" in cmdline else None


def _netns_pids(netns: str) -> list[int]:
    if not _netns_exists(netns):
        return []
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _stop_host(layout: Layout, host: str, note: Note) -> None:
    netns = layout.netns(host)
    init = _init_pid(layout, host)
    if init is not None:
        os.kill(init, signal.SIGTERM)  # stops libvirtd, virtlogd and the guests, then exits
        _wait_gone([init], 20)
    # Whatever is still in the namespace (a guest of a host whose init died) is killed.
    for _ in range(3):
        pids = _netns_pids(netns)
        if not pids:
            break
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids, 10)
    if _link_exists(layout.veth(host)):
        _ip("link", "del", layout.veth(host), check=False)
    if _netns_exists(netns):
        _ip("netns", "del", netns)
    _remove_cgroups(layout.cgroup(host))
    shutil.rmtree(layout.host_dir(host), ignore_errors=True)
    note(f"{host}: removed")


def _remove_cgroups(name: str) -> None:
    """Remove `<hierarchy>/<name>` and what libvirt left under it, deepest first."""
    if not CGROUP_ROOT.is_dir():
        return
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*dirs, top]:
            with suppress(OSError):
                directory.rmdir()


# --- the cluster --------------------------------------------------------------------------------

def up(name: str = DEFAULT_NAME, hosts: int = 3, subnet: str | None = None,
       spool: Path | None = None, nics: int = 2, note: Note = lambda _m: None) -> ClusterStatus:
    """Bring the cluster to `hosts` healthy hosts; return its status."""
    validate(name, hosts, subnet)
    _require_root()
    if not 0 <= nics <= 16:
        raise VmjobsError(f"--nics must be between 0 and 16, not {nics}")
    with _locked(name):
        existing = layout_of(name)
        if existing is not None and subnet is not None and existing.subnet != subnet:
            raise VmjobsError(f"dev cluster {name!r} is up on {existing.subnet}; "
                              f"'vmjob devcluster down' before changing --subnet")
        layout = existing or Layout(name, subnet or DEFAULT_SUBNET,
                                    (spool or SPOOL_ROOT / name).absolute())
        if spool is not None and spool.absolute() != layout.spool:
            raise VmjobsError(f"dev cluster {name!r} uses the spool {layout.spool}; "
                              f"'vmjob devcluster down' before changing --spool")
        if existing is None:
            _check_subnet_free(layout)
        _save_state(layout, hosts)
        layout.spool.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.spool, 0o755)
        _ensure_bridge(layout)
        for stale in _hosts_present(layout):
            if int(stale[1:]) > hosts:
                _stop_host(layout, stale, note)
        for index in range(1, hosts + 1):
            host = host_name(index)
            current = host_status(layout, index)
            if current.healthy:
                note(f"{host}: already up at {current.uri}")
                continue
            if current.init_pid is not None or _netns_exists(layout.netns(host)):
                note(f"{host}: not healthy ({current.problem}); rebuilding it")
                _stop_host(layout, host, note)
            _start_host(layout, index, note)
        write_config(layout, hosts, nics)
        return status(name)


def _hosts_present(layout: Layout) -> list[str]:
    """Hosts of this cluster that exist on the machine, from their namespaces and links."""
    found = set()
    prefix = f"vmj-{layout.name}-"
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        netns = line.split()[0] if line.split() else ""
        if netns.startswith(prefix) and re.fullmatch(r"h\d+", netns[len(prefix):]):
            found.add(netns[len(prefix):])
    for link in json.loads(_ip("-j", "link", "show", check=False).stdout or "[]"):
        ifname = link.get("ifname", "")
        veth_prefix = f"vh-{layout.name}-"
        if ifname.startswith(veth_prefix) and re.fullmatch(r"h\d+", ifname[len(veth_prefix):]):
            found.add(ifname[len(veth_prefix):])
    if layout.run_dir.is_dir():
        found.update(p.name for p in layout.run_dir.iterdir()
                     if p.is_dir() and re.fullmatch(r"h\d+", p.name))
    return sorted(found, key=lambda h: int(h[1:]))


def power_off(name: str, host: str, note: Note = lambda _m: None) -> None:
    """Take one host away as a power loss would: silently first (its link cut, so not a byte
    of its TCP connections' close, FIN or RST, reaches anyone: clients learn of it only by
    keepalive or probe), then its libvirtd, virtlogd and guests killed, its namespace and
    link gone (so nothing answers at its address). `up` builds it again.
    Raises VmjobsError for a host the cluster does not have."""
    validate(name)
    _require_root()
    with _locked(name):
        layout = layout_of(name)
        if layout is None or host not in _hosts_present(layout):
            raise VmjobsError(f"dev cluster {name!r} has no host {host!r}")
        _ip("link", "set", layout.veth(host), "down", check=False)
        _stop_host(layout, host, note)


def down(name: str = DEFAULT_NAME, note: Note = lambda _m: None) -> bool:
    """Remove every host, the bridge and the state of the cluster; False if nothing was there."""
    validate(name)
    _require_root()
    with _locked(name):
        layout = layout_of(name) or Layout(name, DEFAULT_SUBNET, SPOOL_ROOT / name)
        present = _hosts_present(layout)
        bridge = _link_exists(layout.bridge)
        if not present and not bridge and not layout.run_dir.exists():
            return False
        for host in present:
            _stop_host(layout, host, note)
        if bridge:
            _ip("link", "del", layout.bridge)
            note(f"bridge {layout.bridge}: removed")
        shutil.rmtree(layout.run_dir, ignore_errors=True)
        return True


def host_status(layout: Layout, index: int) -> HostStatus:
    host = host_name(index)
    init = _init_pid(layout, host)
    base = HostStatus(host, layout.address(index), layout.uri(index), init, False, None, None)
    if init is None:
        return _with(base, problem="not running")
    try:
        conn = open_uri(layout.uri(index))
    except VirtError as exc:
        return _with(base, problem=f"libvirtd: {exc.get_error_message()}")
    try:
        hostname = conn.getHostname()
        domains = len(conn.listAllDomains())
    except VirtError as exc:
        return _with(base, problem=f"libvirtd: {exc.get_error_message()}")
    finally:
        conn.close()
    problem = None if hostname == host else f"answers as {hostname!r}"
    return _with(base, libvirtd=True, hostname=hostname, domains=domains, problem=problem)


def _with(status: HostStatus, **changes: object) -> HostStatus:
    return HostStatus(**{**asdict(status), **changes})


def status(name: str = DEFAULT_NAME) -> ClusterStatus:
    validate(name)
    layout = layout_of(name)
    if layout is None:
        raise VmjobsError(f"dev cluster {name!r} is not up (start it with 'vmjob devcluster up')")
    count = int(str((_load_state(name) or {}).get("hosts", 0)))
    return ClusterStatus(layout, tuple(host_status(layout, i) for i in range(1, count + 1)))


def env_line(name: str = DEFAULT_NAME) -> str:
    validate(name)
    layout = layout_of(name)
    if layout is None or not layout.config_path.exists():
        raise VmjobsError(f"dev cluster {name!r} is not up (start it with 'vmjob devcluster up')")
    return f"export VMJOBS_CONFIG={layout.config_path}"


def restart_libvirtd(layout: Layout, host: str, timeout_s: float = 30.0) -> None:
    """Start a host's libvirtd again after it was stopped (tests stop it mid-migration).

    Waits for the old libvirtd to be gone first (SIGKILL after `timeout_s`): the host's init
    only starts a libvirtd when none runs.
    """
    init = _init_pid(layout, host)
    if init is None:
        raise VmjobsError(f"{host}: not running")
    old = libvirtd_pid(layout, host)
    if old is not None and _wait_gone([old], timeout_s):
        with suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
        _wait_gone([old], 10)
    os.kill(init, signal.SIGUSR1)


def libvirtd_pid(layout: Layout, host: str) -> int | None:
    try:
        return int(json.loads(layout.ready_file(host).read_text())["libvirtd"])
    except (OSError, ValueError, KeyError):
        return None
