"""The configuration file: where it is looked for, what it may say, and the embedded default.

Looked for in order: --config, $VMJOBS_CONFIG, /etc/vmjobs/config.yaml; with none of them the
embedded default (one host `local` at qemu:///system, spool /var/lib/vmjobs) applies.
Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vmjobs.errors import ConfigError, NotFound, VmjobsError
from vmjobs.units import MIB, parse_cpu_list, parse_duration, parse_size_mib

if TYPE_CHECKING:
    from vmjobs.spec import Profile

SYSTEM_CONFIG = Path("/etc/vmjobs/config.yaml")
DEFAULT_SOCKET = Path("/run/vmjobs/vmjobs.sock")
EMBEDDED = "<embedded default>"
VIRT_TYPES = ("kvm", "qemu", "auto")
NIC_BACKENDS = ("vfio", "emulated")
START_MODES = ("cold", "warm", "auto")  # vmjobs/template.py
DEFAULT_POOL = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_VENDOR_PRODUCT = re.compile(r"^(0x)?[0-9a-f]{4}:(0x)?[0-9a-f]{4}$")


@dataclass(frozen=True)
class EmulatedNic:
    name: str
    node: int


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str
    reserved_cpus: frozenset[int] = frozenset()
    reserved_memory_mib: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    # the pools it is in (config `pool:`, a name or a list; sorted, never empty); a host in
    # two pools is counted in both (docs/user-guide.md, "Pools")
    pools: tuple[str, ...] = (DEFAULT_POOL,)
    # vfio: which host NICs may be handed to jobs (PCI address or vendor:product)
    nic_allow: tuple[str, ...] = ()
    # emulated: the virtual NICs this host offers and the NUMA node each belongs to
    emulated_nics: tuple[EmulatedNic, ...] = ()
    # gang networks (vmjobs/gangnet.py): the address other hosts' VXLAN packets reach this
    # host at, and the network namespace its guests' taps live in (dev-cluster hosts)
    gang_underlay: str | None = None
    gang_netns: str | None = None


@dataclass(frozen=True)
class Borrow:
    """`borrow:` (docs/borrowing.md): a running job's core whose vCPU ran less than
    `idle_below` of a core (0..1) for `for_s` seconds may be lent to a `--borrow` job, which
    leaves it within `give_back_within_s` once the owner's use of it rises above
    `idle_below` again. `memory`: "off" (a borrower's memory comes from free memory) or
    "balloon" (also from memory an owner holds and its balloon has reported spare for `for_s`,
    less `memory_margin_mib`; docs/borrowing.md, "Borrowing memory")."""

    idle_below: float = 0.1
    for_s: float = 600.0
    give_back_within_s: float = 5.0
    memory: str = "off"
    memory_margin_mib: int = 256

    @property
    def balloon(self) -> bool:
        """Whether owners' memory their balloons report spare may be lent."""
        return self.memory == "balloon"

    def fast_interval_s(self, interval_s: float) -> float:
        """How often lending owners are sampled: a quarter of `give_back_within` (a rise
        is seen within one or two such intervals; the rest is left for the move), never
        faster than every 0.5 s (libvirt is read per owner) nor slower than `interval_s`,
        the ordinary sampling interval."""
        return min(interval_s, max(0.5, self.give_back_within_s / 4))


@dataclass(frozen=True)
class Config:
    path: str
    spool: Path
    hosts: tuple[HostConfig, ...]
    virt_type: str = "auto"
    nic_backend: str = "vfio"
    output_disk_mib: int = 256
    # bytes of stdout/stderr a job may write to the spool (its output.<n>.out files together)
    # before it is stopped FAILED; None: unlimited (`output_limit: unlimited`)
    output_limit_bytes: int | None = 1 << 30
    # KVM probe boots give up after this long and fall back to TCG (see vmjobs.virt.probe)
    kvm_probe_timeout_s: float = 10.0
    # the daemon (`vmjob serve`): its unix socket, optional Prometheus port, and the group
    # whose members act on every user's jobs (root always does)
    socket: Path = DEFAULT_SOCKET
    metrics_port: int | None = None
    admin_group: str | None = None
    # when a queued job that is not preemptible does not fit, move preemptible jobs for it
    preemption: bool = False
    # guests can grow live (`vmjob resize`): up to every cpu of their NUMA node and
    # `hotplug_max_mem_mib` more memory (virtio-mem); off: guests of a fixed size
    hotplug: bool = False
    hotplug_max_mem_mib: int = 1024
    # a resizable job may ask to be resized from inside its guest (`vmjob-ctl resize`)
    resize_from_guest: bool = False
    max_outbound_migrations: int = 1  # live migrations leaving one host at once
    # the daemon's connections: ordinary users' together, one user's, and how long a request
    # line + headers may take to arrive (see vmjobs.daemon.server.Limits)
    max_connections: int = 512
    max_connections_per_user: int = 64
    request_timeout_s: float = 10.0
    # room in the spool per user (unclaimed uploads + directories of jobs not ended), room
    # the spool always keeps free, and how long an unclaimed upload is kept (daemon/uploads.py)
    user_spool_quota_mib: int = 16 << 10
    spool_min_free_mib: int = 1 << 10
    upload_ttl_s: float = 600.0
    # how long a host may stay unreachable (its jobs UNREACHABLE, guests perhaps running on)
    # before it is declared down and its jobs LOST; libvirtd restarts take seconds
    host_down_after_s: float = 300.0
    # guests' real CPU use (vmjobs.daemon.sampler): how often each running guest's vCPU time
    # is read (0: never) and how much of it is kept per job
    usage_sample_interval_s: float = 10.0
    usage_window_s: float = 60.0
    # how a job's guest starts: booted (cold), restored from a template of its image and shape
    # (warm; the start fails if that cannot be done), or warm where possible, else cold (auto)
    start: str = "cold"
    # named hardware profiles (`--profile NAME`, `vmjob profiles`), in the file's order
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    # lending idle cores to --borrow jobs; None (no `borrow:` key): nothing is lent
    borrow: Borrow | None = None

    @property
    def state_db(self) -> Path:
        return self.spool / "state.db"

    def balloon_period_s(self) -> int | None:
        """How often (whole s) a guest's balloon reports its memory use; None: guests get no
        balloon (sampling is off, nobody would read it). The sampling interval, rounded up;
        with `borrow.memory: balloon`, the lending owners' faster interval (their give-back
        is decided from these statistics)."""
        interval = self.usage_sample_interval_s
        if interval <= 0:
            return None
        if self.borrow is not None and self.borrow.balloon:
            interval = self.borrow.fast_interval_s(interval)
        return max(1, math.ceil(interval))

    def host(self, name: str) -> HostConfig:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise NotFound(f"unknown host {name!r} (configured: {known})")

    def pool(self, name: str) -> tuple[str, ...]:
        """The member hosts of pool `name`, in config order; NotFound naming the pools there
        are when no host is in it (the same line for `--pool` and `vmjob pools NAME`)."""
        pools = self.pools
        if name not in pools:
            raise NotFound(f"no pool {name!r} (pools: {', '.join(pools) or 'none'})")
        return pools[name]

    def refuse_unknown(self, host: str | None, pool: str | None) -> None:
        """NotFound for a job's `host` or `pool` (None: any) that the config does not have:
        one line naming those there are, before an image is looked up or a host asked."""
        if host is not None:
            self.host(host)
        if pool is not None:
            self.pool(pool)

    @property
    def pools(self) -> dict[str, tuple[str, ...]]:
        """Pool name -> its member hosts, in config order; pools sorted by name."""
        members: dict[str, list[str]] = {}
        for host in self.hosts:
            for pool in host.pools:
                members.setdefault(pool, []).append(host.name)
        return {pool: tuple(members[pool]) for pool in sorted(members)}


DEFAULT = {
    "spool": "/var/lib/vmjobs",
    "virt_type": "auto",
    "nic_backend": "vfio",
    "hosts": [{"name": "local", "uri": "qemu:///system"}],
}


def locate(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("VMJOBS_CONFIG")
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def load(explicit: str | None = None) -> Config:
    path = locate(explicit)
    if path is None:
        return parse(DEFAULT, EMBEDDED)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VmjobsError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), f"line {line}", "not UTF-8 text") from None
    import yaml  # only with a file: a client given --url / $VMJOBS_URL reads none

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(str(path), where, "not valid YAML") from None
    return parse(data if data is not None else {}, str(path))


class _Reader:
    """Typed access to one mapping of the file, with errors that name the key."""

    def __init__(self, data: Any, path: str, prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, prefix or "(top level)", "must be a mapping")
        self.data, self.path, self.prefix = data, path, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def check_known(self, allowed: set[str]) -> None:
        for name in self.data:
            if name not in allowed:
                raise self.fail(str(name), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def str(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.data.get(name, default)
        if value is None:
            raise self.fail(name, "is required")
        if not isinstance(value, str) or not value:
            raise self.fail(name, "must be a non-empty string")
        if choices and value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def int(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(name, f"must be an integer >= {minimum}")
        return value

    def seconds(self, name: str, default: float, maximum: float) -> float:
        """A number of seconds in (0, maximum]: never NaN, infinite or a boolean."""
        value = self.data.get(name, default)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 < value <= maximum):  # NaN fails every comparison
            raise self.fail(name, f"must be a number of seconds > 0 and <= {maximum:g}")
        return float(value)

    def size_mib(self, name: str, default: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        try:
            return parse_size_mib(str(value))
        except VmjobsError as exc:
            raise self.fail(name, str(exc)) from None

    def list(self, name: str) -> list[Any]:
        value = self.data.get(name, [])
        if not isinstance(value, list):
            raise self.fail(name, "must be a list")
        return value


def parse(data: Any, path: str) -> Config:
    top = _Reader(data, path, "")
    top.check_known(
        {"spool", "hosts", "virt_type", "nic_backend", "output_disk_size", "output_limit",
         "kvm_probe_timeout",
         "socket", "metrics_port", "admin_group", "preemption", "max_outbound_migrations",
         "max_connections", "max_connections_per_user", "request_timeout",
         "user_spool_quota", "spool_min_free", "upload_ttl", "host_down_after",
         "usage_sample_interval", "usage_window", "start", "hotplug", "hotplug_max_mem",
         "resize_from_guest",
         "profiles", "borrow"}
    )
    spool = Path(top.str("spool", DEFAULT["spool"]))
    if not spool.is_absolute():
        raise top.fail("spool", "must be an absolute path")
    raw_hosts = top.list("hosts") if "hosts" in top.data else DEFAULT["hosts"]
    if not raw_hosts:
        raise top.fail("hosts", "must name at least one host")
    hosts = tuple(_parse_host(h, path, f"hosts[{i}]") for i, h in enumerate(raw_hosts))
    names = [h.name for h in hosts]
    for name in names:
        if names.count(name) > 1:
            raise top.fail("hosts", f"host name {name!r} appears twice")
    seen: dict[str, str] = {}
    for host in hosts:
        # Two entries for one libvirtd each reconcile the other's guests as leftovers.
        other = seen.setdefault(same_host_key(host.uri), host.name)
        if other != host.name:
            raise top.fail("hosts", f"{other!r} and {host.name!r} have the same libvirt "
                                    f"URI {host.uri!r}: one host, configured twice")
    socket = Path(top.str("socket", str(DEFAULT_SOCKET)))
    if not socket.is_absolute():
        raise top.fail("socket", "must be an absolute path")
    metrics_port = top.data.get("metrics_port")
    if metrics_port is not None and (
        isinstance(metrics_port, bool) or not isinstance(metrics_port, int)
        or not 1 <= metrics_port <= 65535
    ):
        raise top.fail("metrics_port", "must be a TCP port number (1-65535)")
    admin_group = top.str("admin_group") if top.data.get("admin_group") is not None else None
    hotplug = top.data.get("hotplug", False)
    if not isinstance(hotplug, bool):
        raise top.fail("hotplug", "must be on or off")
    hotplug_max_mem = top.size_mib("hotplug_max_mem", Config.hotplug_max_mem_mib)
    resize_from_guest = top.data.get("resize_from_guest", False)
    if not isinstance(resize_from_guest, bool):
        raise top.fail("resize_from_guest", "must be on or off")
    if hotplug_max_mem % 2:
        raise top.fail("hotplug_max_mem", "must be a multiple of 2M (virtio-mem's block)")
    preemption = top.data.get("preemption", False)
    if not isinstance(preemption, bool):  # YAML reads on/off/true/false as booleans
        raise top.fail("preemption", "must be on or off")
    return Config(
        path=path,
        spool=spool,
        hosts=hosts,
        virt_type=top.str("virt_type", "auto", VIRT_TYPES),
        nic_backend=top.str("nic_backend", "vfio", NIC_BACKENDS),
        output_disk_mib=top.size_mib("output_disk_size", 256),
        output_limit_bytes=_output_limit(top),
        kvm_probe_timeout_s=top.seconds("kvm_probe_timeout", 10.0, 3600.0),
        socket=socket,
        metrics_port=metrics_port,
        admin_group=admin_group,
        preemption=preemption,
        hotplug=hotplug,
        hotplug_max_mem_mib=hotplug_max_mem,
        resize_from_guest=resize_from_guest,
        max_outbound_migrations=top.int("max_outbound_migrations", 1, minimum=1),
        max_connections=top.int("max_connections", 512, minimum=1),
        max_connections_per_user=top.int("max_connections_per_user", 64, minimum=1),
        request_timeout_s=top.seconds("request_timeout", 10.0, 3600.0),
        user_spool_quota_mib=top.size_mib("user_spool_quota", Config.user_spool_quota_mib),
        spool_min_free_mib=top.size_mib("spool_min_free", Config.spool_min_free_mib),
        upload_ttl_s=float(top.int("upload_ttl", int(Config.upload_ttl_s), minimum=1)),
        host_down_after_s=_host_down_after(top),
        usage_sample_interval_s=_duration(top, "usage_sample_interval", 10.0, zero=True),
        usage_window_s=_duration(top, "usage_window", 60.0),
        start=top.str("start", "cold", START_MODES),
        profiles=_profiles(top),
        borrow=_borrow(top),
    )


def _profiles(top: _Reader) -> dict[str, Profile]:
    """`profiles: {NAME: {cpus, mem, nics, numa, threads, hugepages, pool, labels}}`, each
    value checked as a job spec's (vmjobs.spec.make_profile)."""
    raw = top.data.get("profiles") or {}
    if not isinstance(raw, Mapping):
        raise top.fail("profiles", "must be a mapping of profile names to spec fields")
    if not raw:
        return {}
    # only with profiles: the spec's checks load the placement model, which a plain client
    # command (`vmjob list`) does not need (tests/unit/test_thin_client.py)
    from vmjobs.spec import SpecError, make_profile

    profiles = {}
    for name, fields in raw.items():
        try:
            profiles[str(name)] = make_profile(name, fields)
        except SpecError as exc:
            raise top.fail(f"profiles.{name}", str(exc)) from None
    return profiles


def system_warnings(config: Config) -> list[str]:
    """What the config names that this machine lacks, one line each (the daemon logs them at
    start and answers them in /v1/status; `vmjob hosts` prints them). A missing admin_group
    is a warning, not an error: membership is read per request, so creating the group later
    takes effect without a restart."""
    warnings = []
    if config.admin_group is not None:
        try:
            grp.getgrnam(config.admin_group)
        except KeyError:
            warnings.append(f"{config.path}: admin_group: no group {config.admin_group!r} on "
                            "this system: only root acts on every job")
    return warnings


def same_host_key(uri: str) -> str:
    """What makes two libvirt URIs name one daemon as far as the text tells: scheme and
    host case-insensitive, default ports and a trailing slash ignored. (Two names for one
    machine are caught when connecting, by the hosts' UUIDs.)"""
    parts = urlsplit(uri.strip())
    driver, _, transport = parts.scheme.lower().partition("+")
    host = (parts.hostname or "").lower()
    port = None
    with contextlib.suppress(ValueError):
        port = parts.port
    default_port = _DEFAULT_PORTS.get(transport or ("tls" if host else ""))
    where = f"{host}:{port}" if port not in (None, default_port) else host
    # neither user nor transport matters: qemu+ssh://root@a/system and qemu+tcp://a/system
    # reach one libvirtd
    return f"{driver}://{where}{parts.path.rstrip('/')}?{parts.query}"


_DEFAULT_PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22, "libssh": 22, "libssh2": 22}


MAX_HOST_DOWN_AFTER_S = 7 * 86400.0


def _host_down_after(top: _Reader) -> float:
    """`host_down_after`: seconds, or a duration such as 5m; finite, > 0, at most a week."""
    value = top.data.get("host_down_after", 300)
    problem = "must be a duration > 0 and at most 7d, e.g. 30s, 5m or 300"
    if isinstance(value, bool):
        raise top.fail("host_down_after", problem)
    try:
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
    except (VmjobsError, TypeError, ValueError):
        raise top.fail("host_down_after", problem) from None
    if not 0 < seconds <= MAX_HOST_DOWN_AFTER_S:  # also refuses NaN
        raise top.fail("host_down_after", problem)
    return seconds


def _duration(top: _Reader, key: str, default: float, zero: bool = False) -> float:
    """A duration key: seconds or e.g. 10s, 5m; from 1 s to a day (or 0 with `zero`). Less
    than a second would have the daemon read libvirt for every guest continuously."""
    value = top.data.get(key, default)
    problem = (f"must be a duration from 1s to 1d{' (0: off)' if zero else ''}, "
               "e.g. 10s, 1m or 30")
    if isinstance(value, bool):
        raise top.fail(key, problem)
    try:
        seconds = (0.0 if zero and str(value).strip() in ("0", "0s") else
                   parse_duration(value) if isinstance(value, str) else float(value))
    except (VmjobsError, TypeError, ValueError):
        raise top.fail(key, problem) from None
    if not (1 <= seconds <= 86400 or (zero and seconds == 0)):  # also refuses NaN
        raise top.fail(key, problem)
    return seconds


MAX_GIVE_BACK_S = 3600.0


def _borrow(top: _Reader) -> Borrow | None:
    """`borrow:` — absent or null: no lending. Lending needs the sampler (it decides from
    measured use), so `usage_sample_interval: 0` with `borrow:` is refused."""
    if top.data.get("borrow") is None:
        return None
    section = _Reader(top.data["borrow"], top.path, "borrow")
    section.check_known({"idle_below", "for", "give_back_within", "memory", "memory_margin"})
    idle = section.data.get("idle_below", Borrow.idle_below)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or not 0 < idle < 1:
        raise section.fail("idle_below", "must be a fraction of a core > 0 and < 1, e.g. 0.1")
    memory = section.data.get("memory", "off")
    if memory is False:  # YAML reads a bare `off` as false
        memory = "off"
    if memory not in ("off", "balloon"):
        raise section.fail("memory", f"must be off or balloon, not {memory!r}")
    margin = section.size_mib("memory_margin", Borrow.memory_margin_mib)
    within = _duration(section, "give_back_within", Borrow.give_back_within_s)
    if within > MAX_GIVE_BACK_S:
        raise section.fail("give_back_within", "must be at most 1h")
    if top.data.get("usage_sample_interval") in (0, "0", "0s"):
        raise section.fail("for", "lending decides from sampled use: set "
                                  "usage_sample_interval above 0")
    return Borrow(idle_below=float(idle), for_s=_duration(section, "for", Borrow.for_s),
                  give_back_within_s=within, memory=memory, memory_margin_mib=margin)


UNLIMITED = "unlimited"


def _output_limit(top: _Reader) -> int | None:
    """`output_limit`: a size (1G, 512M, 1.5G, or bytes; whole MiB, rounded up) or
    `unlimited`; None for unlimited. A bare number is bytes, like every size in the file."""
    value = top.data.get("output_limit")
    if value is None:
        return Config.output_limit_bytes
    if value == UNLIMITED:
        return None
    if isinstance(value, bool):
        raise top.fail("output_limit", f"must be a size such as 1G or {UNLIMITED!r}")
    try:
        return parse_size_mib(str(value), "output_limit") * MIB
    except VmjobsError as exc:
        raise top.fail("output_limit", f"{exc}, or {UNLIMITED!r}") from None


def _pools(host: _Reader) -> tuple[str, ...]:
    """`pool:` of a host: one name or a list of names (letters, digits, . _ -); sorted,
    duplicates dropped; absent: the default pool."""
    value = host.data.get("pool", DEFAULT_POOL)
    names = value if isinstance(value, list) else [value]
    problem = "must be a pool name or a list of pool names (letters, digits, . _ -)"
    if not names or not all(isinstance(n, str) and _NAME.match(n) for n in names):
        raise host.fail("pool", problem)
    return tuple(sorted(set(names)))


def _parse_host(data: Any, path: str, prefix: str) -> HostConfig:
    host = _Reader(data, path, prefix)
    host.check_known(
        {"name", "uri", "reserved_cpus", "reserved_memory", "labels", "pool", "nics",
         "emulated_nics", "gang_underlay", "gang_netns"}
    )
    name = host.str("name")
    if not _NAME.match(name):
        raise host.fail("name", f"{name!r} is not a valid host name (letters, digits, . _ -)")
    reserved = host.data.get("reserved_cpus", "")
    try:
        reserved_cpus = parse_cpu_list(str(reserved)) if reserved != "" else frozenset()
    except VmjobsError as exc:
        raise host.fail("reserved_cpus", str(exc)) from None
    labels = host.data.get("labels", {}) or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str | int) for k, v in labels.items()
    ):
        raise host.fail("labels", "must be a mapping of names to strings")
    nic_allow = []
    for i, entry in enumerate(host.list("nics")):
        text = str(entry).lower()
        if not (_PCI_ADDRESS.match(text) or _VENDOR_PRODUCT.match(text)):
            raise host.fail(
                f"nics[{i}]", f"{entry!r} is neither a PCI address (0000:03:00.0) "
                "nor vendor:product (8086:1572)"
            )
        nic_allow.append(text)
    emulated = []
    for i, entry in enumerate(host.list("emulated_nics")):
        nic = _Reader(entry, path, host.key(f"emulated_nics[{i}]"))
        nic.check_known({"name", "node"})
        nic_name = nic.str("name")
        # The name becomes the device id "emulated:<name>": reserved under a UNIQUE key and
        # listed comma-separated in the domain metadata, so it must be unique and plain.
        if not _NAME.match(nic_name):
            raise nic.fail("name", f"{nic_name!r} is not a valid NIC name (letters, digits, . _ -)")
        if any(e.name == nic_name for e in emulated):
            raise nic.fail("name", f"NIC name {nic_name!r} appears twice on this host")
        emulated.append(EmulatedNic(name=nic_name, node=nic.int("node", 0)))
    underlay = host.data.get("gang_underlay")
    if underlay is not None:
        try:
            underlay = str(ipaddress.IPv4Address(str(underlay)))
        except ValueError:
            raise host.fail("gang_underlay", f"{underlay!r} is not an IPv4 address") from None
    netns = host.data.get("gang_netns")
    if netns is not None and not (isinstance(netns, str) and _NAME.match(netns)):
        raise host.fail("gang_netns", f"{netns!r} is not a network namespace name")
    return HostConfig(
        name=name,
        uri=host.str("uri"),
        reserved_cpus=reserved_cpus,
        reserved_memory_mib=host.size_mib("reserved_memory", 0),
        labels=tuple(sorted((k, str(v)) for k, v in labels.items())),
        pools=_pools(host),
        nic_allow=tuple(nic_allow),
        emulated_nics=tuple(emulated),
        gang_underlay=underlay,
        gang_netns=netns,
    )
