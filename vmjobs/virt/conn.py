"""Connections to the hosts' libvirt daemons, with errors that say what to do, and the
domain calls every part of vmjobs makes: look up, start (transient), destroy, is it running."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import libvirt

import placement
from vmjobs.config import Config, HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.host_checks import duplicate_message, host_uuid, host_warnings, same_host
from vmjobs.virt import Connection, Domain, VirtError
from vmjobs.virt.inventory import read_host, read_topology


def open_uri(uri: str) -> Connection:
    """A connection to the libvirtd at `uri`; VirtError if it does not answer."""
    return libvirt.open(uri)


def connect(host: HostConfig) -> Connection:
    """A connection to a configured host; VmjobsError (one line, with a hint) if none."""
    try:
        return open_uri(host.uri)
    except VirtError as exc:
        raise VmjobsError(
            f"cannot connect to host {host.name!r} at {host.uri}: {exc.get_error_message()}"
            " (is libvirtd running there?)"
        ) from None


def lookup_domain(conn: Connection, name: str) -> Domain | None:
    try:
        return conn.lookupByName(name)
    except VirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def start(conn: Connection, xml: str) -> Domain:
    """Start a transient domain: when the guest stops, nothing of it stays defined."""
    return conn.createXML(xml, 0)


def destroy_quietly(dom: Domain | None) -> None:
    """Stop a guest that may already have stopped by itself."""
    if dom is None:
        return
    try:
        dom.destroy()
    except VirtError as exc:
        gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
        if exc.get_error_code() not in gone:
            raise


def is_running(dom: Domain) -> bool:
    try:
        return bool(dom.isActive())
    except VirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # a transient domain disappears when it stops
        raise


@dataclass
class Reached:
    """The hosts that answered (connection + inventory) and why the others did not."""

    conns: dict[str, Connection] = field(default_factory=dict)
    hosts: list[placement.Host] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # see vmjobs.host_checks

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def connect_hosts(config: Config, only: str | None = None) -> Reached:
    """Connect to every configured host (or just `only`) and read its inventory.

    An unreachable host is reported, not fatal, unless it is the only one asked for.
    """
    chosen = [config.host(only)] if only else list(config.hosts)
    reached = Reached()
    uuids: dict[str, str | None] = {}
    for host_config in chosen:
        conn = None
        try:
            conn = connect(host_config)
            uuid = identify(conn, host_config.name, uuids)
            host, warnings = inspect(conn, host_config, config.nic_backend)
        except (VmjobsError, VirtError) as exc:
            if conn is not None:
                conn.close()
            message = str(exc) if isinstance(exc, VmjobsError) else exc.get_error_message()
            if len(chosen) == 1:
                raise VmjobsError(message) from None
            reached.errors[host_config.name] = message
            continue
        uuids[host_config.name] = uuid
        reached.conns[host_config.name] = conn
        reached.hosts.append(host)
        if warnings:
            reached.warnings[host_config.name] = warnings
    return reached


def identify(conn: Connection, name: str, others: Mapping[str, str | None]) -> str | None:
    """The host UUID of `conn`'s libvirtd (None if it reports none); VmjobsError if one of
    `others` (host name -> UUID) is the same libvirtd under another name."""
    uuid = host_uuid(conn.getCapabilities())
    other = same_host(name, uuid, others)
    if other is not None and uuid is not None:
        raise VmjobsError(duplicate_message(name, other, uuid))
    return uuid


def inspect(conn: Connection, host_config: HostConfig,
            nic_backend: str) -> tuple[placement.Host, list[str]]:
    """What the engine sees of the host (`inventory.read_host`) and what its config entry
    says that the host contradicts (`host_checks.host_warnings`); VirtError, VmjobsError."""
    host = read_host(conn, host_config, nic_backend)
    warnings = host_warnings(host_config, read_topology(conn).nodes, nic_backend)
    return host, warnings


def is_alive(conn: Connection) -> bool:
    """Whether the connection still answers (libvirt's own view: closed, or its keepalive
    timed out, is not alive)."""
    try:
        return bool(conn.isAlive())
    except VirtError:
        return False


def round_trip(conn: Connection) -> int:
    """One cheap request answered by the host's libvirtd itself (its libvirt version): the
    liveness probe (`vmjobs.daemon.liveness`). Blocks until the answer comes, the connection
    closes or its keepalive expires; VirtError on failure."""
    return int(conn.getLibVersion())


def close_quietly(conn: Connection) -> None:
    """Close a connection that may already be broken."""
    with contextlib.suppress(VirtError):
        conn.close()
