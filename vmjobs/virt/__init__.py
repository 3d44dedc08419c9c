"""The libvirt adapter: the only package in vmjobs that imports `libvirt`.

Connections (`conn`), host inventory (`inventory`), domain XML (`domain_xml`), NIC replug
(`replug`), the guest clock (`guestclock`), the KVM probe (`probe`), the migration driver
(`migration`), save/restore (`saves`), live re-pinning (`pinning`), domain jobs and states
(`domains`) and lifecycle events with keepalive (`events`). The rest of vmjobs names libvirt's
types and its error only through the aliases below, so what vmjobs asks of libvirt is all here.
"""

from __future__ import annotations

import libvirt

VirtError = libvirt.libvirtError  # every error libvirt raises; .get_error_message() says why
Connection = libvirt.virConnect  # one open connection to a host's libvirtd
Domain = libvirt.virDomain  # a handle on one guest (it may have stopped since)


def _quiet(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; ours reach the user as one line instead.
    return None


libvirt.registerErrorHandler(_quiet, None)

__all__ = ["Connection", "Domain", "VirtError"]
