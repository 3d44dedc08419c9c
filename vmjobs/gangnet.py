"""A private layer-2 network per gang, across hosts, made of the kernel's own devices.

Per gang and per host that runs a member: a Linux bridge `vjgb<slot>` and a VXLAN device
`vjgx<slot>` (VNI `VNI_BASE + slot`, UDP 4789, no learning) enslaved to it, with one
all-zeros FDB entry per other member host (unicast head-end replication: broadcast, unknown
unicast and multicast go to every other member host's underlay address; the kernel learns
the rest from the packets). Each member's guest gets a virtio NIC on its host's bridge
(`<interface type='bridge'>`, `nic_element`). Nothing is relayed in user space.

Isolation: a gang's frames exist only on its own bridges and in VXLAN packets carrying its
own VNI, sent only to its member hosts; the bridges have no IP address (no route from the
host into them) and no IPv6 link-local address (`addrgenmode none`), so neither another gang
nor the host's own stack is on the segment. (Anyone able to send UDP to a host's underlay
address could inject frames with a guessed VNI: the underlay is the cluster's own network,
which should not accept port 4789 from elsewhere. docs/multinode.md says so.)

Addresses: the gang's slot picks a /24 of `POOL` (10.64.0.0/10: 16384 slots); member i is
`.i+1`, MAC `52:54:00:<slot>:<i>`. The guest init configures them (images/init) from
`/vmjob/net/` in the job's archive (`guest_files`).

Where the host-side commands run (`HostNet`): on this machine for a local URI; inside the
host's network namespace for a dev-cluster host (`gang_netns` in the config: `ip netns exec`);
over OpenSSH (`ssh HOST -- ip ...`, the URI's user and host, batch mode: keys only) for a
remote host. Every command is an argv list of values vmjobs made (names from the slot,
addresses from the config); the SSH leg joins them with `shlex.join`, nothing from a user.

The slot registry lives in the spool (`<spool>/gangnet/<slot>.json`, under a file lock), so
that after a daemon crash recovery knows which devices belong to which gang (`orphans`,
`sweep`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vmjobs.config import Config, HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.filelock import exclusive
from vmjobs.virt.domain_xml import BridgeNic

POOL = ipaddress.IPv4Network("10.64.0.0/10")
SLOTS = 1 << (24 - POOL.prefixlen)  # one /24 each: 16384
VNI_BASE = 0x7A0000  # VNIs 0x7A0000 .. 0x7A3FFF: recognisable in a capture
VXLAN_PORT = 4789  # IANA's VXLAN port
MTU = 1450  # 1500 on the underlay minus VXLAN's 50 bytes of outer headers
MAX_MEMBERS = 253  # .1 .. .253 of the gang's /24
BRIDGE_PREFIX, VXLAN_PREFIX = "vjgb", "vjgx"
_DEVICE = re.compile(r"^vjg[bx]([0-9a-f]{4})$")
ANY_MAC = "00:00:00:00:00:00"


class GangNetError(VmjobsError):
    pass


@dataclass(frozen=True)
class Member:
    index: int
    host: str


@dataclass(frozen=True)
class GangNet:
    """One gang's network: its slot and its members in index order."""

    gang_id: str
    slot: int
    members: tuple[Member, ...]
    # hosts that keep the devices without a member (the source of a move in progress)
    spare: tuple[str, ...] = ()

    @property
    def vni(self) -> int:
        return VNI_BASE + self.slot

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(POOL.network_address) + (self.slot << 8), 24))

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_PREFIX}{self.slot:04x}"

    @property
    def vxlan(self) -> str:
        return f"{VXLAN_PREFIX}{self.slot:04x}"

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + 1 + index)

    def mac(self, index: int) -> str:
        return f"52:54:00:{self.slot >> 8:02x}:{self.slot & 0xff:02x}:{index:02x}"

    def hosts(self) -> list[str]:
        """The hosts with the gang's devices, each once: member hosts in member order, then
        spare ones."""
        return list(dict.fromkeys([*(m.host for m in self.members), *self.spare]))

    def peers(self) -> str:
        """$VMJOB_PEERS: the members' addresses in index order, space-separated."""
        return " ".join(self.address(m.index) for m in sorted(self.members,
                                                                key=lambda m: m.index))

    def addresses(self) -> dict[int, str]:
        return {m.index: self.address(m.index) for m in self.members}

    def to_json(self) -> dict[str, object]:
        return {"gang": self.gang_id, "slot": self.slot,
                "members": [[m.index, m.host] for m in self.members], "spare": list(self.spare)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> GangNet:
        members = data["members"]
        assert isinstance(members, list)
        spare = data.get("spare") or []
        assert isinstance(spare, list)
        return cls(str(data["gang"]), int(str(data["slot"])),
                   tuple(Member(int(i), str(h)) for i, h in members), tuple(map(str, spare)))


# --- what the guest gets ---------------------------------------------------------------------

def guest_files(net: GangNet, index: int) -> dict[str, bytes]:
    """Files for the member's job archive under /vmjob/net/ (images/init reads them):
    `mac`, `address` (CIDR), `mtu`, `hosts` (/etc/hosts lines `ADDR nodeI`)."""
    hosts = "".join(f"{net.address(m.index)} node{m.index}\n"
                    for m in sorted(net.members, key=lambda m: m.index))
    return {
        "mac": f"{net.mac(index)}\n".encode(),
        "address": f"{net.address(index)}/{net.subnet.prefixlen}\n".encode(),
        "mtu": f"{MTU}\n".encode(),
        "hosts": hosts.encode(),
    }


def guest_env(net: GangNet) -> dict[str, str]:
    return {"VMJOB_PEERS": net.peers()}


def bridge_nic(net: GangNet, index: int) -> BridgeNic:
    """The member's NIC on its host's gang bridge (`domain_xml.bridge_nic`)."""
    return BridgeNic(mac=net.mac(index), bridge=net.bridge, mtu=MTU)


# --- the host side -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostNet:
    """How to run the host-side commands on one host, and its underlay address."""

    host: str
    underlay: str | None
    netns: str | None = None
    ssh: str | None = None  # [user@]host for a remote host

    def argv(self, command: Sequence[str]) -> list[str]:
        if self.netns is not None:
            return ["ip", "netns", "exec", self.netns, *command]
        if self.ssh is not None:
            return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", self.ssh, "--",
                    shlex.join(command)]
        return list(command)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(command), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise GangNetError(f"host {self.host}: {' '.join(command)}: "
                               f"{proc.stderr.strip() or 'failed'}")
        return proc


def host_net(host: HostConfig) -> HostNet:
    """`HostNet` from a host's config (see the module doc for the three cases)."""
    if host.gang_netns:
        return HostNet(host.name, host.gang_underlay, netns=host.gang_netns)
    parts = urlsplit(host.uri)
    if not parts.hostname or parts.hostname in ("localhost", "127.0.0.1"):
        return HostNet(host.name, host.gang_underlay)
    target = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
    return HostNet(host.name, host.gang_underlay, ssh=target)


def host_nets(config: Config) -> dict[str, HostNet]:
    return {h.name: host_net(h) for h in config.hosts}


def spool_tag(spool: Path) -> str:
    """A tag of the spool (SHA-256 of its absolute path, 8 hex digits) in every device's alias:
    daemons of other spools on the same host never sweep each other's devices."""
    return hashlib.sha256(str(spool.absolute()).encode()).hexdigest()[:8]


def _alias(tag: str, net: GangNet) -> str:
    return f"vmjobs {tag} {net.gang_id}"


def _up(net: GangNet, here: HostNet, remotes: list[str], tag: str) -> None:
    _down(net, here)
    here.run("ip", "link", "add", net.bridge, "type", "bridge")
    here.run("ip", "link", "set", "dev", net.bridge, "alias", _alias(tag, net))
    here.run("ip", "link", "set", "dev", net.bridge, "addrgenmode", "none", "mtu", str(MTU))
    if remotes:
        _vxlan_up(net, here, remotes, tag)
    here.run("ip", "link", "set", "dev", net.bridge, "up")


def _vxlan_up(net: GangNet, here: HostNet, remotes: list[str], tag: str) -> None:
    """The gang's VXLAN device on `here`, flooding to `remotes`, enslaved to its bridge."""
    if here.underlay is None:
        raise GangNetError(f"host {here.host} has no gang_underlay address in the config")
    here.run("ip", "link", "add", net.vxlan, "type", "vxlan", "id", str(net.vni),
             "local", here.underlay, "dstport", str(VXLAN_PORT), "nolearning")
    here.run("ip", "link", "set", "dev", net.vxlan, "addrgenmode", "none", "mtu", str(MTU))
    here.run("ip", "link", "set", "dev", net.vxlan, "alias", _alias(tag, net))
    # nolearning + static all-zeros entries: floods go to the member hosts and nowhere
    # else; known unicast is learned from the bridge's own FDB
    for remote in remotes:
        here.run("bridge", "fdb", "append", ANY_MAC, "dev", net.vxlan, "dst", remote)
    here.run("ip", "link", "set", "dev", net.vxlan, "master", net.bridge, "up")


def _down(net: GangNet, here: HostNet) -> None:
    for device in (net.vxlan, net.bridge):
        proc = here.run("ip", "link", "del", "dev", device, check=False)
        if proc.returncode != 0 and "Cannot find device" not in proc.stderr \
                and "does not exist" not in proc.stderr:
            raise GangNetError(f"host {here.host}: ip link del {device}: {proc.stderr.strip()}")


def _apply(net: GangNet, nets: Mapping[str, HostNet], tag: str) -> None:
    hosts = net.hosts()
    for host in hosts:
        here = _hostnet(nets, host)
        remotes = []
        for other in hosts:
            if other != host:
                underlay = _hostnet(nets, other).underlay
                if underlay is None:
                    raise GangNetError(f"host {other} has no gang_underlay address in the "
                                       "config")
                remotes.append(underlay)
        _up(net, here, remotes, tag)


def _hostnet(nets: Mapping[str, HostNet], host: str) -> HostNet:
    try:
        return nets[host]
    except KeyError:
        raise GangNetError(f"host {host} is not configured") from None


# --- the registry --------------------------------------------------------------------------------

def _registry(spool: Path) -> Path:
    return spool / "gangnet"


def _lock(spool: Path) -> Path:
    return spool / "locks" / "gangnet"


def _record(spool: Path, slot: int) -> Path:
    return _registry(spool) / f"{slot:04x}.json"


def networks(spool: Path) -> list[GangNet]:
    """Every gang network the registry holds."""
    found = []
    for path in sorted(_registry(spool).glob("*.json")):
        try:
            found.append(GangNet.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            continue
    return found


def find(spool: Path, gang_id: str) -> GangNet | None:
    return next((n for n in networks(spool) if n.gang_id == gang_id), None)


def _write(spool: Path, net: GangNet) -> None:
    path = _record(spool, net.slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(net.to_json()))
    os.replace(tmp, path)


def first_slot(gang_id: str) -> int:
    """Where the search for a free slot starts: a hash of the gang id (SHA-256), so a gang
    usually gets the same slot it would get on any daemon."""
    return int.from_bytes(hashlib.sha256(gang_id.encode()).digest()[:4], "big") % SLOTS


# --- the interface the gang code calls -----------------------------------------------------------

def create(spool: Path, nets: Mapping[str, HostNet], gang_id: str,
           members: Iterable[tuple[int, str]]) -> GangNet:
    """Make the gang's network on every member host; return it (addresses: `.addresses()`).

    `members`: (index, host) pairs, indexes 0..N-1. Idempotent for a gang that has one
    (the devices are rebuilt). On failure everything made is removed and GangNetError
    raised."""
    ordered = tuple(sorted((Member(i, h) for i, h in members), key=lambda m: m.index))
    if not ordered or [m.index for m in ordered] != list(range(len(ordered))):
        raise GangNetError("a gang's members are indexed 0..N-1")
    if len(ordered) > MAX_MEMBERS:
        raise GangNetError(f"a gang network holds at most {MAX_MEMBERS} members")
    with exclusive(_lock(spool)):
        existing = find(spool, gang_id)
        if existing is not None:
            net = GangNet(gang_id, existing.slot, ordered)
        else:
            taken = {n.slot for n in networks(spool)}
            start = first_slot(gang_id)
            slot = next((s % SLOTS for s in range(start, start + SLOTS) if s % SLOTS not in taken),
                        None)
            if slot is None:
                raise GangNetError(f"all {SLOTS} gang networks are in use")
            net = GangNet(gang_id, slot, ordered)
        _write(spool, net)  # first: a crash from here on leaves devices recovery can find
    try:
        _apply(net, nets, spool_tag(spool))
    except (GangNetError, subprocess.TimeoutExpired, OSError) as exc:
        # undo what was made, as far as it goes; devices left on a host that failed are found
        # by name by the next `sweep`
        for host in net.hosts():
            with contextlib.suppress(GangNetError, subprocess.TimeoutExpired, OSError):
                _down(net, _hostnet(nets, host))
        with exclusive(_lock(spool)):
            _record(spool, net.slot).unlink(missing_ok=True)
        if isinstance(exc, GangNetError):
            raise
        raise GangNetError(f"gang {gang_id}: making its network failed: {exc}") from None
    return net


def move(spool: Path, nets: Mapping[str, HostNet], gang_id: str, index: int,
         host: str, keep: Iterable[str] = ()) -> GangNet:
    """Member `index` runs (or is about to run) on `host`; the hosts in `keep` hold the
    devices even without a member. A migration calls it twice: before the switch-over with
    `keep=[source]` (the destination gets the bridge and VXLAN, the source keeps its own, every
    host's flood list covers both), and after it with no `keep` (the source loses its devices,
    or, if the move failed, `host` = the source and the destination loses them). Hosts that
    keep devices are never rebuilt (a rebuilt bridge would drop the guests' taps): only their
    flood lists change. Raises GangNetError."""
    return relocate(spool, nets, gang_id, {index: host}, keep)


def relocate(spool: Path, nets: Mapping[str, HostNet], gang_id: str,
             hosts: Mapping[int, str], keep: Iterable[str] = ()) -> GangNet:
    """`move` for several members at once (`hosts`: index -> host; the others stay): a gang
    restored on new hosts gets its network there in one step, never through a layout in
    between (members briefly sharing a host). The slot, so the members' addresses and MACs,
    is kept. Raises GangNetError; the record then already says the new layout (relocate
    back to undo)."""
    with exclusive(_lock(spool)):
        net = find(spool, gang_id)
        if net is None:
            raise GangNetError(f"gang {gang_id} has no network")
        members = tuple(Member(m.index, hosts.get(m.index, m.host)) for m in net.members)
        member_hosts = {m.host for m in members}
        spare = tuple(h for h in dict.fromkeys(keep) if h not in member_hosts)
        moved = GangNet(gang_id, net.slot, members, spare)
        _write(spool, moved)
    before, after = net.hosts(), moved.hosts()
    tag = spool_tag(spool)
    for name in after:
        here = _hostnet(nets, name)
        if name not in before:
            _up(moved, here, [_underlay(nets, h) for h in after if h != name], tag)
            continue
        if len(before) == 1 and len(after) > 1:  # it had the bridge alone: now it needs VXLAN
            # (a VXLAN device left from an earlier layout with more hosts is made afresh)
            here.run("ip", "link", "del", "dev", moved.vxlan, check=False)
            _vxlan_up(moved, here, [_underlay(nets, h) for h in after if h != name], tag)
            continue
        for other in after:
            if other != name and other not in before:
                here.run("bridge", "fdb", "append", ANY_MAC, "dev", moved.vxlan, "dst",
                         _underlay(nets, other), check=False)
    for gone in [h for h in before if h not in after]:
        _down(net, _hostnet(nets, gone))
        underlay = _hostnet(nets, gone).underlay
        for name in after:
            if underlay:
                _hostnet(nets, name).run("bridge", "fdb", "del", ANY_MAC, "dev", moved.vxlan,
                                         "dst", underlay, check=False)
    return moved


def _underlay(nets: Mapping[str, HostNet], host: str) -> str:
    underlay = _hostnet(nets, host).underlay
    if underlay is None:
        raise GangNetError(f"host {host} has no gang_underlay address in the config")
    return underlay


def remove(spool: Path, nets: Mapping[str, HostNet], gang_id: str) -> bool:
    """Remove the gang's devices from every member host, then its record. False if it had
    none. A host that cannot be reached keeps its record (the next `sweep` tries again)."""
    net = find(spool, gang_id)
    if net is None:
        return False
    failed = []
    for host in net.hosts():
        try:
            _down(net, _hostnet(nets, host))
        except (GangNetError, subprocess.TimeoutExpired, OSError) as exc:
            failed.append(str(exc))
    if failed:
        raise GangNetError("; ".join(failed))
    with exclusive(_lock(spool)):
        _record(spool, net.slot).unlink(missing_ok=True)
    return True


def orphans(spool: Path, live: Iterable[str]) -> list[GangNet]:
    """The registered networks of gangs that are not in `live` (the gangs still running)."""
    alive = set(live)
    return [n for n in networks(spool) if n.gang_id not in alive]


def devices_on(here: HostNet, tag: str) -> set[int]:
    """Slots of the gang devices on a host that this spool made (`ip -j link`, their alias)."""
    proc = here.run("ip", "-j", "link", "show")
    slots = set()
    for link in json.loads(proc.stdout or "[]"):
        match = _DEVICE.match(link.get("ifname", ""))
        alias = str(link.get("ifalias", "")).split(" ")
        if match and alias[:2] == ["vmjobs", tag]:
            slots.add(int(match.group(1), 16))
    return slots


def sweep(spool: Path, nets: Mapping[str, HostNet], live: Iterable[str]) -> list[str]:
    """Recovery: remove every gang network of this spool that no live gang owns — registered
    ones of ended gangs, and devices (found by name and by this spool's tag in their alias)
    whose slot no live gang holds. Returns what was done, one line each; hosts that cannot be
    reached are skipped."""
    alive = set(live)
    done = []
    for net in orphans(spool, alive):
        try:
            remove(spool, nets, net.gang_id)
            done.append(f"gang {net.gang_id}: network removed")
        except GangNetError as exc:
            done.append(f"gang {net.gang_id}: network not removed: {exc}")
    owned = {n.slot for n in networks(spool) if n.gang_id in alive}
    tag = spool_tag(spool)
    for here in nets.values():
        if here.ssh is not None and here.underlay is None:
            continue  # a remote host not set up for gangs: no SSH round at every start
        try:
            present = devices_on(here, tag)
        except (GangNetError, subprocess.TimeoutExpired, OSError, ValueError):
            continue
        for slot in sorted(present - owned):
            stray = GangNet("?", slot, ())
            try:
                _down(stray, here)
                done.append(f"host {here.host}: stray gang devices {stray.bridge} removed")
            except GangNetError as exc:
                done.append(str(exc))
    return done
