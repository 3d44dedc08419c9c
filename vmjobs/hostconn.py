"""Connections to the hosts' libvirt daemons, with errors that say what to do."""

from __future__ import annotations

import libvirt

from vmjobs.config import HostConfig
from vmjobs.errors import VmjobsError


def _quiet(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; ours reach the user as one line instead.
    return None


libvirt.registerErrorHandler(_quiet, None)


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
