"""One libvirt connection per host, with lifecycle events, keepalive and loss detection.

libvirt delivers events through its default event loop, which one thread runs. Callbacks run
on that thread and must not block it (keepalive replies are processed there too), so they only
put a note on a queue; the daemon's event worker acts on it. A connection that closes (host
down, libvirtd gone, keepalive timed out) or whose liveness probe goes unanswered
(`vmjobs.daemon.liveness`: a thread per host, independent of the event loop) is reported as
host down (unreachable: its guests may run on); a reconnect thread per such host tries again
every few seconds, reports the host up when it answers, and reports it lost if it stays away
for the configured `host_down_after`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace

import placement
from placement import HostState
from vmjobs.config import Config, HostConfig
from vmjobs.daemon.liveness import Prober
from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection, VirtError, events
from vmjobs.virt.conn import close_quietly, connect, identify, inspect

log = logging.getLogger("vmjobs.daemon")
RECONNECT_FIRST_S = 0.5
# A refused or failed connection attempt costs next to nothing, and a libvirtd restart takes
# seconds: try again at most this far apart, so a returning host is back within seconds.
RECONNECT_MAX_S = 3.0
DOMAIN_PREFIX = "vmjob-"

@dataclass(frozen=True)
class GuestStopped:
    host: str
    job_id: str
    at: float  # time.time() when the event reached us
    detail: int


@dataclass(frozen=True)
class GuestPoweredOff:
    """The guest shut itself down (the init's power-off); QEMU is still going away."""

    host: str
    job_id: str
    at: float


@dataclass(frozen=True)
class HostDown:
    host: str
    why: str


@dataclass(frozen=True)
class HostUp:
    host: str


@dataclass(frozen=True)
class HostLost:
    """The host stayed unreachable for `host_down_after`: it is down, its jobs are lost."""

    host: str
    why: str


Note = GuestStopped | GuestPoweredOff | HostDown | HostUp | HostLost


class Hosts:
    """The connections and inventories of every configured host; thread-safe."""

    def __init__(self, config: Config, notes: queue.SimpleQueue[Note]) -> None:
        self.config = config
        self.notes = notes
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}
        self._inventory: dict[str, placement.Host] = {}
        self._errors: dict[str, str] = {}
        self._uuids: dict[str, str | None] = {}
        self._warnings: dict[str, list[str]] = {}
        self._stopping = threading.Event()
        self._reconnecting: set[str] = set()
        # since when each unreachable host has been so (monotonic); None once reported lost
        self._down_since: dict[str, float | None] = {}
        # Bumped whenever `inventory()` would answer differently (a host connected, with its
        # inventory, or its connection closed): the live cluster model re-reads the hosts
        # only then (`vmjobs.daemon.live`).
        self._generation = 0

    # --- state -----------------------------------------------------------------------------

    def conn(self, name: str) -> Connection | None:
        with self._lock:
            return self._conns.get(name)

    def conns(self) -> dict[str, Connection]:
        """The connections of every host that is up now."""
        with self._lock:
            return dict(self._conns)

    def is_up(self, name: str) -> bool:
        with self._lock:
            return name in self._conns

    def is_lost(self, name: str) -> bool:
        """Whether the host was declared lost (`HostLost` reported) and has not answered since."""
        with self._lock:
            return name in self._down_since and self._down_since[name] is None

    def error(self, name: str) -> str | None:
        with self._lock:
            return self._errors.get(name)

    def warnings(self, name: str) -> list[str]:
        """What the host's config entry says that the host contradicts (host_checks)."""
        with self._lock:
            return list(self._warnings.get(name, ()))

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def inventory(self) -> list[placement.Host]:
        """Every host ever seen, in config order; those without a connection marked down."""
        with self._lock:
            hosts = []
            for host_config in self.config.hosts:
                host = self._inventory.get(host_config.name)
                if host is None:
                    continue
                if host_config.name not in self._conns:
                    host = replace(host, state=HostState.DOWN)
                hosts.append(host)
            return hosts

    # --- connecting ------------------------------------------------------------------------

    def connect_all(self) -> None:
        """Connect every host; unreachable ones are retried in the background."""
        for host_config in self.config.hosts:
            try:
                self._connect(host_config)
            except VmjobsError as exc:
                log.warning("%s", exc)
                with self._lock:
                    self._errors[host_config.name] = str(exc)
                self._start_reconnect(host_config)

    def connect_once(self, only: str | None = None) -> dict[str, str]:
        """Connect every host (or just `only`) once, with no retry in the background (a
        direct `vmjob run`, which never waits for a host); why each of the others did not
        answer. Raises VmjobsError when `only` does not answer (or is not configured)."""
        chosen = [self.config.host(only)] if only else list(self.config.hosts)
        errors = {}
        for host_config in chosen:
            try:
                self._connect(host_config)
            except VmjobsError as exc:
                if only:
                    raise
                errors[host_config.name] = str(exc)
                with self._lock:
                    self._errors[host_config.name] = str(exc)
        return errors

    def _connect(self, host_config: HostConfig) -> None:
        name = host_config.name
        conn = connect(host_config)
        try:
            with self._lock:
                others = {n: self._uuids.get(n) for n in self._conns}
            uuid = identify(conn, name, others)
            events.watch(conn, name, self._on_guest, self._on_close)
            inventory, warnings = inspect(conn, host_config, self.config.nic_backend)
        except VirtError as exc:
            close_quietly(conn)
            raise VmjobsError(
                f"host {name}: cannot watch it: {exc.get_error_message()}"
            ) from None
        except VmjobsError:
            close_quietly(conn)
            raise
        with self._lock:
            self._conns[name] = conn
            self._inventory[name] = inventory
            self._generation += 1
            self._uuids[name] = uuid
            self._warnings[name] = warnings
            self._errors.pop(name, None)
            self._down_since.pop(name, None)
        log.info("host %s: connected (%s)", name, host_config.uri)
        for warning in warnings:
            log.warning("%s", warning)
        # libvirt's own view only, every second (no round trip: see `Prober.watch_alive`)
        Prober(name, conn, lambda: self.conn(name),
               lambda dead, why: self._on_unreachable(dead, name, why), self._stopping,
               interval_s=1.0, call=None).start()

    def _start_reconnect(self, host_config: HostConfig) -> None:
        with self._lock:
            if host_config.name not in self._down_since:
                self._down_since[host_config.name] = time.monotonic()
                self._watch_down(host_config.name, self.config.host_down_after_s)
            if host_config.name in self._reconnecting or self._stopping.is_set():
                return
            self._reconnecting.add(host_config.name)
        threading.Thread(target=self._reconnect, args=(host_config,), daemon=True,
                         name=f"reconnect-{host_config.name}").start()

    def _reconnect(self, host_config: HostConfig) -> None:
        pause = RECONNECT_FIRST_S
        try:
            while not self._stopping.wait(pause):
                try:
                    self._connect(host_config)
                except VmjobsError as exc:
                    with self._lock:
                        self._errors[host_config.name] = str(exc)
                    pause = min(pause * 2, RECONNECT_MAX_S)
                    continue
                self.notes.put(HostUp(host_config.name))
                return
        finally:
            with self._lock:
                self._reconnecting.discard(host_config.name)

    def _watch_down(self, name: str, after_s: float) -> None:
        """In `after_s` seconds, report the host lost (HostLost) if it has been unreachable
        without a break for `host_down_after` by then; otherwise look again when it could be.
        A timer of its own, because a connection attempt to a stalled libvirtd can block the
        reconnect thread for as long as the stall lasts. Like Slurm's "not responding" before
        "down"."""
        def check() -> None:
            with self._lock:
                since = self._down_since.get(name)
                why = self._errors.get(name) or "unreachable"
            if since is None or self._stopping.is_set():
                return  # it came back (a later loss starts a timer of its own)
            left = since + self.config.host_down_after_s - time.monotonic()
            if left > 0:
                self._watch_down(name, left)
                return
            with self._lock:
                if self._down_since.get(name) != since:
                    return
                self._down_since[name] = None  # reported once per loss
            log.warning("host %s: down for good after %.0fs: %s", name,
                        self.config.host_down_after_s, why)
            self.notes.put(HostLost(name, why))

        timer = threading.Timer(after_s, check)
        timer.daemon = True
        timer.name = f"down-{name}"
        timer.start()

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            conns, self._conns = self._conns, {}
            self._generation += 1
        for conn in conns.values():
            events.unwatch(conn)
            close_quietly(conn)

    # --- libvirt callbacks (event loop thread: never block here) ----------------------------

    def _on_guest(self, host: str, name: str, event: events.GuestEvent, detail: int) -> None:
        if not name.startswith(DOMAIN_PREFIX):
            return
        job_id = name[len(DOMAIN_PREFIX):]
        if event is events.GuestEvent.STOPPED:
            self.notes.put(GuestStopped(host, job_id, time.time(), detail))
        else:
            self.notes.put(GuestPoweredOff(host, job_id, time.time()))

    def _on_close(self, conn: Connection, host: str, why: str) -> None:
        if self._declare_down(conn, host, why):
            # libvirt still holds a reference; closing from inside its callback is not
            # allowed, so the reconnect thread (a fresh connection) is all we start here.
            self._start_reconnect(self.config.host(host))

    # --- the liveness probe (its own thread: may block briefly, never on a host) -------------

    def _on_unreachable(self, conn: Connection, host: str, why: str) -> None:
        """The probe of `conn` went unanswered: the host is down, whatever libvirt's event
        loop did or did not report. The connection is closed on a thread of its own (closing
        sends a request the dead host never answers; libvirt's keepalive ends that wait).
        Whether libvirt then fails requests other threads still wait on is libvirt's part
        (docs/borrowing.md, "Lost hosts")."""
        if not self._declare_down(conn, host, why):
            return
        self._start_reconnect(self.config.host(host))

        def close() -> None:
            events.unwatch(conn)
            close_quietly(conn)

        threading.Thread(target=close, name=f"close-{host}", daemon=True).start()

    def _declare_down(self, conn: Connection, host: str, why: str) -> bool:
        """Forget `conn` as `host`'s connection and report the host down (HostDown); False
        if `conn` is no longer its connection (already reported, closed or replaced)."""
        with self._lock:
            if self._conns.get(host) is not conn:
                return False  # an old connection we already replaced or closed
            del self._conns[host]
            self._generation += 1
            self._errors[host] = why
        log.warning("host %s: down: %s", host, why)
        self.notes.put(HostDown(host, why))
        return True
