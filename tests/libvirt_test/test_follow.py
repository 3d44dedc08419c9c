"""Following a job's output by events, against libvirt's test driver: `guest.follow_output`
(the direct run) ends on the domain's lifecycle event, and `daemon/logs.stream` wakes on new
output and on the daemon's state change.

The safety timeouts are raised to 10 minutes for these tests, and every step must happen
within a minute: only inotify and the events can have woken the follower, never a poll.
"""

from __future__ import annotations

import queue
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from placement import Request
from vmjobs import guest
from vmjobs.config import parse
from vmjobs.daemon import logs
from vmjobs.daemon.core import Daemon
from vmjobs.guest import GuestEnd, JobFiles, follow_output
from vmjobs.jobs import JobRecord, JobState
from vmjobs.virt.conn import destroy_quietly
from vmjobs.virt.events import start_event_loop

URI = "test:///default"
NEVER_S = 600.0
BOUND_S = 60.0


def drain_into(items: Iterator[bytes | None], out: queue.Queue) -> threading.Thread:
    def run() -> None:
        for item in items:
            if item:
                out.put(item)
        out.put(None)  # the end
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


@pytest.fixture
def events_conn() -> Iterator[libvirt.virConnect]:
    start_event_loop()  # before the connection, or it never delivers events
    conn = libvirt.open(URI)
    yield conn
    conn.close()


def test_direct_follow_wakes_on_output_and_ends_on_the_stop_event(
        events_conn: libvirt.virConnect, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "FOLLOW_SAFETY_S", NEVER_S)
    root = ET.fromstring(events_conn.lookupByName("test").XMLDesc(0))
    root.find("name").text = "vmjob-follow1"  # type: ignore[union-attr]
    root.remove(root.find("uuid"))  # type: ignore[arg-type]
    dom = events_conn.createXML(ET.tostring(root, encoding="unicode"), 0)
    files = JobFiles(tmp_path / "job")
    files.dir.mkdir()
    out = files.output(0)
    out.touch()
    ended = GuestEnd(events_conn, dom, files)
    got: queue.Queue = queue.Queue()
    try:
        drain_into(follow_output(files, ended), got)
        append(out, b"first line\n")
        assert got.get(timeout=BOUND_S) == b"first line\n"
        append(out, b"second\n")
        assert got.get(timeout=BOUND_S) == b"second\n"
        dom.destroy()  # STOPPED: the follower reads what is left and ends
        assert got.get(timeout=BOUND_S) is None
        assert ended.stopped.is_set() and ended.powered_off.is_set()
    finally:
        ended.close()
        destroy_quietly(dom)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    start_event_loop()
    made = Daemon(parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                         "hosts": [{"name": "a", "uri": URI}]}, "test"))
    yield made
    made.shutdown()


def test_daemon_logs_follow_wakes_on_output_and_on_the_end(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "FOLLOW_SAFETY_S", NEVER_S)
    with daemon.lock:
        daemon.store.add_job(JobRecord(id="j1", owner="alice", uid=1000,
                                       state=JobState.QUEUED, spec={}),
                             Request(cpus=1, memory_mib=128), None, "submitted")
    files = JobFiles.of(daemon.config.spool, "j1")
    got: queue.Queue = queue.Queue()
    # followed before the job has a directory (queued): its creation is seen once launched
    drain_into(logs.stream(daemon, "j1", follow=True), got)
    time.sleep(0.2)
    files.dir.mkdir(parents=True)
    out = files.output(0)
    out.touch()
    daemon.wake()  # the launch's state change: the follower arms its watch
    append(out, b"hello\n")
    assert got.get(timeout=BOUND_S) == b"hello\n"
    append(out, b"more\n")
    assert got.get(timeout=BOUND_S) == b"more\n"
    with daemon.lock:
        daemon.store.transition("j1", JobState.CANCELLED, "cancelled")
    daemon.wake()
    assert got.get(timeout=BOUND_S) is None
    assert not daemon.followers  # the stream deregistered its watch
