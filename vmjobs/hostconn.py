"""Connections to the hosts' libvirt daemons, with errors that say what to do."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import libvirt

import placement
from vmjobs.config import Config, HostConfig
from vmjobs.errors import VmjobsError
from vmjobs.host_checks import duplicate_message, host_uuid, host_warnings, same_host
from vmjobs.inventory import read_host, read_topology


def _quiet(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; ours reach the user as one line instead.
    return None


libvirt.registerErrorHandler(_quiet, None)

_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it on a thread (once per process).

    Must happen before the first connection is opened: connections opened earlier never
    deliver events.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True



def connect(host: HostConfig) -> libvirt.virConnect:
    try:
        return libvirt.open(host.uri)
    except libvirt.libvirtError as exc:
        raise VmjobsError(
            f"cannot connect to host {host.name!r} at {host.uri}: {exc.get_error_message()}"
            " (is libvirtd running there?)"
        ) from None


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def destroy_quietly(dom: libvirt.virDomain | None) -> None:
    """Stop a guest that may already have stopped by itself."""
    if dom is None:
        return
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
        if exc.get_error_code() not in gone:
            raise


def is_running(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # a transient domain disappears when it stops
        raise


@dataclass
class Reached:
    """The hosts that answered (connection + inventory) and why the others did not."""

    conns: dict[str, libvirt.virConnect] = field(default_factory=dict)
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
            uuid = host_uuid(conn.getCapabilities())
            other = same_host(host_config.name, uuid, uuids)
            if other is not None and uuid is not None:
                raise VmjobsError(duplicate_message(host_config.name, other, uuid))
            host = read_host(conn, host_config, config.nic_backend)
            warnings = host_warnings(host_config, read_topology(conn).nodes, config.nic_backend)
        except (VmjobsError, libvirt.libvirtError) as exc:
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
