"""A liveness probe per connected host, on a thread of its own, with a timeout.

libvirt tells us of a lost host in two ways, both through its event loop: the connection's
close callback (the host closed the TCP connection) and keepalive (pings answered or not).
A host that loses power closes nothing, so everything rests on keepalive, and keepalive, the
close callback and the lifecycle events all need libvirt's event loop thread to run. This
probe needs neither: every `PROBE_INTERVAL_S` its thread makes one cheap round trip to the
host's libvirtd on the host's own connection (`virt.conn.round_trip`) from a worker thread,
and waits for the answer at most `PROBE_TIMEOUT_S`. A round trip that does not come back in
time, or fails on a connection libvirt no longer takes for alive, makes the host unreachable
(`Hosts` then reports it down, closes that connection and reconnects), whatever any other host
or thread does. A worker stuck on a dead host's round trip blocks only itself; the probe
thread ends with the verdict and a new one starts with the next connection.

The daemon runs the probe without the round trip (`call=None`, `Prober.watch_alive`): only
the local `isAlive` look, every second — a request in flight as keepalive closed the
connection crashed libvirt 9.0's client (SIGSEGV). The round trip stays for hosts that hang
without closing anything, behind the same interface, tested on libvirt's test driver.

Bound with the round trip: a host that stops answering is reported unreachable at most
`PROBE_INTERVAL_S + PROBE_TIMEOUT_S` (32 s) after its last answer — in practice ~8 s,
when the `isAlive` look sees libvirt's keepalive give the connection up —, and declared down
`host_down_after` later (docs/operations.md, "Hosts that stop answering").

The verdicts are an explicit state machine over plain values (`Probe`, `sent`, `answered`,
`failed`, `waited`), so they are tested without threads or hosts.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from vmjobs.virt import Connection, VirtError
from vmjobs.virt.conn import is_alive, round_trip

PROBE_INTERVAL_S = 2.0  # from one answered probe to the next
# An answer later than this is no answer. Generous: libvirtd answers a getLibVersion in
# milliseconds, but a loaded 2-core machine with busy TCG guests can delay it by seconds, and
# a false "unreachable" costs a reconnect and a recovery pass (the guests are taken back)
# and fails what was in flight on the connection (a migration). A host that really vanished
# is seen sooner, by keepalive through the `isAlive` look (~8 s): this is the last resort.
PROBE_TIMEOUT_S = 30.0
# While a round trip is on its way, how often to ask libvirt (locally, no request) whether it
# still holds the connection for alive
ALIVE_CHECK_S = 0.5


class Health(enum.Enum):
    ANSWERING = "answering"  # the last probe was answered (or none was sent yet)
    WAITING = "waiting"  # a probe is on its way, sent at `Probe.sent_at`
    UNREACHABLE = "unreachable"  # no answer in time, or the connection is dead: report it


@dataclass(frozen=True)
class Probe:
    """One host's probe: its health, when the pending round trip was sent (monotonic s) and,
    once unreachable, why in words."""

    health: Health = Health.ANSWERING
    sent_at: float | None = None
    why: str = ""


# The transitions (anything else is a bug: ValueError).
#   ANSWERING --sent--> WAITING --answered--> ANSWERING
#   WAITING --failed (connection dead)--> UNREACHABLE
#   WAITING --waited past timeout--> UNREACHABLE
# UNREACHABLE is final for the probe of that connection.

def sent(probe: Probe, now: float) -> Probe:
    """A round trip leaves at `now` (monotonic s)."""
    _expect(probe, Health.ANSWERING, "send")
    return Probe(Health.WAITING, now)


def answered(probe: Probe) -> Probe:
    """The round trip came back: libvirtd answers (an error reply is an answer too)."""
    _expect(probe, Health.WAITING, "answer")
    return Probe()


def failed(probe: Probe, why: str) -> Probe:
    """The round trip failed and libvirt holds the connection for dead (closed, keepalive
    expired, socket error): unreachable now, `why` in words."""
    _expect(probe, Health.WAITING, "fail")
    return replace(probe, health=Health.UNREACHABLE, why=why)


def waited(probe: Probe, now: float, timeout_s: float) -> Probe:
    """Time passed without an answer: unreachable once the pending round trip is `timeout_s`
    old at `now`; otherwise unchanged."""
    _expect(probe, Health.WAITING, "wait")
    assert probe.sent_at is not None
    if now - probe.sent_at < timeout_s:
        return probe
    return replace(probe, health=Health.UNREACHABLE,
                   why=f"libvirtd did not answer a probe within {timeout_s:g}s")


def _expect(probe: Probe, health: Health, what: str) -> None:
    if probe.health is not health:
        raise ValueError(f"cannot {what} a probe that is {probe.health.value}")


class Prober:
    """The probe thread of one host's connection. `on_unreachable(conn, why)` is called once,
    from this thread, when the host stops answering; the thread then ends. It also ends,
    silently, when `current()` no longer returns `conn` (the connection was closed or
    replaced) or `stopping` is set."""

    def __init__(self, host: str, conn: Connection,
                 current: Callable[[], Connection | None],
                 on_unreachable: Callable[[Connection, str], None],
                 stopping: threading.Event,
                 interval_s: float = PROBE_INTERVAL_S,
                 timeout_s: float = PROBE_TIMEOUT_S,
                 call: Callable[[Connection], object] | None = round_trip) -> None:
        self.host = host
        self.conn = conn
        self.current = current
        self.on_unreachable = on_unreachable
        self.stopping = stopping
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.call = call

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"probe-{self.host}", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        if self.call is None:
            self.watch_alive()
            return
        probe = Probe()
        while not self.stopping.wait(self.interval_s):
            if self.current() is not self.conn:
                return
            probe = self.once(probe)
            if probe.health is Health.UNREACHABLE:
                if self.current() is self.conn and not self.stopping.is_set():
                    self.on_unreachable(self.conn, probe.why)  # it logs the host down
                return

    def watch_alive(self) -> None:
        """Without a round trip (`call` None, what the daemon uses): every `interval_s`, ask
        libvirt locally whether it still holds the connection for alive, so a keepalive
        expiry is reported even when libvirt runs no close callback. No request of ours is
        ever left waiting on a dying connection: libvirt 9.0's client crashed the daemon
        (SIGSEGV in libvirt.so) when the round trip's request was in flight as keepalive
        closed the connection (test_a_libvirtd_restart_or_stall_is_not_a_lost_job[stop])."""
        while not self.stopping.wait(self.interval_s):
            if self.current() is not self.conn:
                return
            if not is_alive(self.conn):
                if self.current() is self.conn and not self.stopping.is_set():
                    self.on_unreachable(self.conn, "libvirt closed the connection "
                                                   "(keepalive timed out or socket error)")
                return

    def once(self, probe: Probe) -> Probe:
        """One round trip, waited for at most `timeout_s`: ANSWERING or UNREACHABLE."""
        answers: queue.SimpleQueue[str | None] = queue.SimpleQueue()

        def trip() -> None:
            try:
                self.call(self.conn)
            except VirtError as exc:
                # An error reply is still libvirtd answering; a dead connection is not.
                answers.put(None if is_alive(self.conn) else
                            f"probe failed: {exc.get_error_message()}")
                return
            answers.put(None)

        probe = sent(probe, time.monotonic())
        # A worker per round trip: if the host is gone, only this worker waits on it.
        threading.Thread(target=trip, name=f"probe-{self.host}-trip", daemon=True).start()
        while probe.health is Health.WAITING:
            assert probe.sent_at is not None
            left = probe.sent_at + self.timeout_s - time.monotonic()
            try:
                why = answers.get(timeout=min(max(left, 0.0), ALIVE_CHECK_S))
            except queue.Empty:
                if not is_alive(self.conn):
                    # libvirt gave up on the connection (keepalive, socket error) in another
                    # thread's request, and may never wake ours nor run the close callback
                    probe = failed(probe, "libvirt closed the connection (keepalive timed "
                                          "out or socket error)")
                else:
                    probe = waited(probe, time.monotonic(), self.timeout_s)
                continue
            return answered(probe) if why is None else failed(probe, why)
        return probe
