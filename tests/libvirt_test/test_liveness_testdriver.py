"""The liveness probe's thread (`vmjobs.daemon.liveness.Prober`) on libvirt's test driver: real
round trips through the libvirt API; a host that never answers is a probe call that never
returns (what a powered-off host does to a request: nothing comes back)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from vmjobs.config import parse
from vmjobs.daemon.hosts import HostDown, Hosts, HostUp, Note
from vmjobs.daemon.liveness import Prober
from vmjobs.virt import events
from vmjobs.virt.conn import round_trip

BOUND_S = 60.0  # generous: a loaded 2-core machine; the checks wait on the event, not a time


class Verdicts:
    """What a prober reported, and an event once it did."""

    def __init__(self) -> None:
        self.seen: list[tuple[libvirt.virConnect, str]] = []
        self.reported = threading.Event()

    def __call__(self, conn: libvirt.virConnect, why: str) -> None:
        self.seen.append((conn, why))
        self.reported.set()


def _counting(call: Callable[[libvirt.virConnect], object]) -> tuple[
        Callable[[libvirt.virConnect], object], threading.Semaphore]:
    done = threading.Semaphore(0)

    def counted(conn: libvirt.virConnect) -> object:
        try:
            return call(conn)
        finally:
            done.release()
    return counted, done


def _wait_trips(done: threading.Semaphore, n: int) -> None:
    for _ in range(n):
        assert done.acquire(timeout=BOUND_S), "the probe stopped probing"


def test_a_silent_host_is_unreachable_within_the_timeout_while_another_answers(
        default_conn: libvirt.virConnect) -> None:
    other = libvirt.open("test:///default")
    stopping, never = threading.Event(), threading.Event()
    silent_verdicts, answering_verdicts = Verdicts(), Verdicts()
    answering_call, answered = _counting(round_trip)
    try:
        silent = Prober("h2", default_conn, lambda: default_conn, silent_verdicts, stopping,
                        interval_s=0.05, timeout_s=0.5, call=lambda _c: never.wait())
        answering = Prober("h3", other, lambda: other, answering_verdicts, stopping,
                           interval_s=0.05, timeout_s=BOUND_S, call=answering_call)
        began = time.monotonic()
        silent_thread, answering_thread = silent.start(), answering.start()
        assert silent_verdicts.reported.wait(BOUND_S), "the silent host was never reported"
        assert time.monotonic() - began >= 0.5  # not before its timeout
        assert silent_verdicts.seen == [
            (default_conn, "libvirtd did not answer a probe within 0.5s")]
        silent_thread.join(BOUND_S)
        assert not silent_thread.is_alive()  # its stuck round trip holds only its worker
        _wait_trips(answered, 5)  # the other host's probe goes on, answered
        assert not answering_verdicts.seen
        assert answering_thread.is_alive()
    finally:
        stopping.set()
        never.set()
        other.close()


def test_an_error_reply_is_an_answer_and_a_closed_connection_is_not(
        default_conn: libvirt.virConnect) -> None:
    stopping = threading.Event()
    try:
        refused = Verdicts()
        # libvirtd answers "no such domain": the host is there
        call, done = _counting(lambda c: c.lookupByName("vmjob-no-such-job"))
        Prober("h1", default_conn, lambda: default_conn, refused, stopping,
               interval_s=0.05, timeout_s=BOUND_S, call=call).start()
        _wait_trips(done, 3)
        assert not refused.seen

        closed = libvirt.open("test:///default")
        closed.close()  # libvirt no longer takes it for alive: every request on it fails
        dead = Verdicts()
        Prober("h2", closed, lambda: closed, dead, stopping, interval_s=0.05,
               timeout_s=BOUND_S).start()
        assert dead.reported.wait(BOUND_S)
        assert dead.seen[0][1].startswith("probe failed: ")
    finally:
        stopping.set()


def test_the_probe_ends_silently_with_its_connection(default_conn: libvirt.virConnect) -> None:
    """A connection closed or replaced (the host reconnected) ends its prober, unreported."""
    current: list[libvirt.virConnect | None] = [default_conn]
    verdicts = Verdicts()
    call, done = _counting(round_trip)
    thread = Prober("h1", default_conn, lambda: current[0], verdicts, threading.Event(),
                    interval_s=0.05, timeout_s=BOUND_S, call=call).start()
    _wait_trips(done, 2)
    current[0] = None
    thread.join(BOUND_S)
    assert not thread.is_alive() and not verdicts.seen


def test_hosts_report_an_unanswered_probe_as_host_down_and_reconnect(tmp_path: Path) -> None:
    """`Hosts` starts a probe with each connection; the probe's verdict takes the host down
    (HostDown, its connection forgotten and closed) and the reconnect brings it back (HostUp,
    a new connection with a probe of its own)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    config = parse({"spool": str(spool), "virt_type": "qemu",
                    "hosts": [{"name": "t", "uri": "test:///default"}]}, "test")
    events.start_event_loop()
    notes: queue.SimpleQueue[Note] = queue.SimpleQueue()
    hosts = Hosts(config, notes)
    try:
        hosts.connect_all()
        first = hosts.conn("t")
        assert first is not None
        assert "probe-t" in {t.name for t in threading.enumerate()}
        hosts._on_unreachable(first, "t", "libvirtd did not answer a probe within 10s")
        assert notes.get(timeout=BOUND_S) == HostDown(
            "t", "libvirtd did not answer a probe within 10s")
        assert notes.get(timeout=BOUND_S) == HostUp("t")
        again = hosts.conn("t")
        assert again is not None and again is not first
        hosts._on_unreachable(first, "t", "late verdict on the old connection")
        assert hosts.conn("t") is again  # a verdict on a replaced connection changes nothing
    finally:
        hosts.close()
