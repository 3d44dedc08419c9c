"""libvirt's events: the default event loop, keepalive, a connection's close and its guests'
lifecycle, decoded into what the daemon acts on (`vmjobs.daemon.hosts`).

Callbacks run on the event loop's thread, which also answers keepalives: the functions given
to `watch` must never block (the daemon only puts a note on a queue).
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Callable

import libvirt

from vmjobs.virt import Connection, Domain, VirtError

KEEPALIVE_INTERVAL_S = 2  # libvirt pings an idle connection this often ...
KEEPALIVE_COUNT = 3  # ... and closes it after this many unanswered pings

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


class GuestEvent(enum.Enum):
    STOPPED = "stopped"  # QEMU is gone (VIR_DOMAIN_EVENT_STOPPED, any detail)
    POWERED_OFF = "powered-off"  # the guest shut itself down; QEMU is still going away


# the guest's own power-off (not a shutdown the host asked for)
_GUEST_SHUTDOWN = (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED,
                   libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection to libvirtd failed",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "connection closed",
}

# (host, domain name, event, libvirt's detail code)
OnGuest = Callable[[str, str, GuestEvent, int], None]
# (the connection that closed, host, why in words)
OnClose = Callable[[Connection, str, str], None]


def watch(conn: Connection, host: str, on_guest: OnGuest, on_close: OnClose) -> None:
    """Keepalive on `conn`, `on_close` when it closes, `on_guest` for each guest's STOPPED and
    guest-initiated SHUTDOWN events. VirtError if libvirt refuses any of it. The callbacks run
    on the event loop thread (`start_event_loop` must have run before `conn` was opened)."""

    def lifecycle(_conn: Connection, dom: Domain, event: int, detail: int, opaque: str) -> None:
        name = dom.name()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            on_guest(opaque, name, GuestEvent.STOPPED, detail)
        elif event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN and detail in _GUEST_SHUTDOWN:
            on_guest(opaque, name, GuestEvent.POWERED_OFF, detail)

    def closed(closed_conn: Connection, reason: int, opaque: str) -> None:
        on_close(closed_conn, opaque,
                 _CLOSE_REASONS.get(reason, f"connection closed (reason {reason})"))

    _keepalive(conn)
    conn.registerCloseCallback(closed, host)
    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, host)


def watch_guest(conn: Connection, dom: Domain, on_event: Callable[[GuestEvent], None]) -> int:
    """`on_event` for this one guest's STOPPED and guest-initiated SHUTDOWN (power-off)
    events, on the event loop thread (never block in it); the id for `unwatch_guest`.
    VirtError if libvirt refuses. Used by a direct `vmjob run`, which follows one guest."""

    def lifecycle(_conn: Connection, _dom: Domain, event: int, detail: int,
                  _opaque: object) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            on_event(GuestEvent.STOPPED)
        elif event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN and detail in _GUEST_SHUTDOWN:
            on_event(GuestEvent.POWERED_OFF)

    return conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle,
                                       None)


def unwatch_guest(conn: Connection, callback_id: int) -> None:
    """Stop `watch_guest`'s reports (a closed connection has taken them along already)."""
    with contextlib.suppress(VirtError):
        conn.domainEventDeregisterAny(callback_id)


def unwatch(conn: Connection) -> None:
    """Stop reporting `conn`'s close (before closing it ourselves)."""
    with contextlib.suppress(VirtError):
        conn.unregisterCloseCallback()


def _keepalive(conn: Connection) -> None:
    """Keepalive on remote connections; drivers without a connection to lose (the test driver,
    an embedded one) do not support it and need none."""
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
    except VirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
