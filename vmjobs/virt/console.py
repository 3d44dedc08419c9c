"""The host end of a job's input port (`org.vmjobs.input.0`, `domain_xml.input_channel`),
reached through `virDomainOpenChannel` as the clock port is, so that it works over any
libvirt connection, remote hosts included, with no agent of ours on the host.

What is written is already framed (`vmjobs.console`); QEMU holds it back while the guest has
not opened the port yet (virtio-serial flow control), so frames sent before the guest's
helper runs are read by it later, in order.
"""

from __future__ import annotations

import contextlib

import libvirt

from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection
from vmjobs.virt.domain_xml import INPUT_CHANNEL


class InputPortError(VmjobsError):
    pass


class InputPort:
    """An open input port of one guest: blocking writes, one writer at a time."""

    def __init__(self, conn: Connection, name: str) -> None:
        try:
            dom = conn.lookupByName(name)
            self._stream = conn.newStream(0)
            dom.openChannel(INPUT_CHANNEL, self._stream, 0)
        except libvirt.libvirtError as exc:
            raise InputPortError(f"no input port: {exc.get_error_message()}") from None

    def send(self, data: bytes) -> None:
        """Write all of `data`; raises InputPortError when the guest (or its host) is gone."""
        try:
            while data:
                sent = self._stream.send(data)
                if sent < 0:
                    raise InputPortError("the input port is not writable")
                data = data[sent:]
        except libvirt.libvirtError as exc:
            raise InputPortError(exc.get_error_message()) from None

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.finish()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
