"""The daemon's control service: one `GangControl` per gang, fed by its members' ports.

Keyed by gang id; each member's port (vmjobs/virt/ctlport.py) is attached to exactly one
(gang, index), so what a guest sends only ever reaches its own gang's state. One lock guards
every gang's state; replies are sent after it is released (a slow guest never holds others
up). One timer thread ends barrier waits whose timeout passed.

The interface the gang code calls:
    hub.open_gang(gang_id, {index: MemberInfo(host, address)})   when the gang starts
    hub.attach(gang_id, index, conn, domain_name)               when a member's guest runs
                                                                (again after a migration)
    hub.member_state(gang_id, index, state, host=None)          as members change
    hub.member_failed(gang_id, index, reason)                   a member failed: poison
    hub.exits_reported(gang_id)                                 members whose init reported
                                                                a failed exit (`ended`)
    hub.close_gang(gang_id)                                     when the gang ends
and for `vmjob kv JOB get|set`: `hub.kv_get`, `hub.kv_set`.

With a `ControlJournal` (the daemon's), every change of a gang's durable state (kv, batons,
barrier rounds, poison, remembered answers: `GangControl.durable`) is queued for the store
under the hub's lock, in order, and the replies it caused go out only once it is committed;
a gang opened again after a daemon restart takes its state up from the store.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vmjobs.control import MAX_LINE, GangControl, MemberInfo, Reply, Rows
from vmjobs.controljournal import ControlJournal
from vmjobs.errors import VmjobsError
from vmjobs.virt import Connection
from vmjobs.virt.ctlport import ControlPort

log = logging.getLogger("vmjobs.control")


class ControlError(VmjobsError):
    pass


@dataclass
class _Gang:
    control: GangControl
    ports: dict[int, ControlPort] = field(default_factory=dict)
    saved: Rows = field(default_factory=dict)  # what the journal has (or has queued)


class ControlHub:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 journal: ControlJournal | None = None) -> None:
        self.clock = clock
        self.journal = journal
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.gangs: dict[str, _Gang] = {}
        self.stopping = False
        threading.Thread(target=self._timer, name="control-timer", daemon=True).start()

    # --- gangs -----------------------------------------------------------------------------

    def open_gang(self, gang_id: str, members: Mapping[int, MemberInfo]) -> None:
        """Open the gang's control state: from the journal if it has some (a restarted
        daemon), else empty. Opening a gang that is open changes nothing."""
        with self.lock:
            if gang_id in self.gangs:
                return
        saved: Rows = {}
        if self.journal is not None:
            try:
                saved = self.journal.load(gang_id)
            except VmjobsError as exc:
                log.warning("gang %s: starting from an empty control state: %s", gang_id, exc)
        with self.lock:
            if gang_id not in self.gangs:
                control = GangControl(gang_id, dict(members), self.clock)
                control.restore(saved)
                self.gangs[gang_id] = _Gang(control, saved=control.durable())
                if saved:
                    log.info("gang %s: control state taken up from the store (%d rows)",
                             gang_id, len(saved))

    def close_gang(self, gang_id: str) -> None:
        """The gang ended: its state is dropped, from the journal too."""
        with self.lock:
            gang = self.gangs.pop(gang_id, None)
            self.changed.notify_all()
            if self.journal is not None:
                self.journal.forget(gang_id)
        if gang is not None:
            for port in gang.ports.values():
                port.close()

    def gang_ids(self) -> list[str]:
        with self.lock:
            return list(self.gangs)

    def attach(self, gang_id: str, index: int, conn: Connection, domain_name: str) -> None:
        """Open member `index`'s port on `conn` (replacing an older one). VirtError if the
        guest or its port is not there; ControlError for an unknown gang or member."""
        with self.lock:
            gang = self._gang(gang_id)
            if index not in gang.control.members:
                raise ControlError(f"gang {gang_id} has no member {index}")

        port: ControlPort | None = None

        def on_line(line: bytes) -> None:
            self.request(gang_id, index, line, port)

        def on_closed() -> None:
            with self.lock:
                current = self.gangs.get(gang_id)
                if current is not None and current.ports.get(index) is port:
                    del current.ports[index]

        # the reader thread starts inside the constructor; lines it reads before `port` is
        # bound wait on the lock taken here
        with self.lock:
            port = ControlPort(conn, domain_name, on_line, on_closed, MAX_LINE)
            gang = self.gangs.get(gang_id)
            old = gang.ports.get(index) if gang is not None else None
            if gang is not None:
                gang.ports[index] = port
        if old is not None:
            old.close()
        if gang is None:
            port.close()

    def request(self, gang_id: str, index: int, line: bytes,
                port: ControlPort | None = None) -> None:
        """A line member `index` sent on `port` (its current one: a line from a port replaced
        meanwhile, or of a gang that ended, is dropped). The replies go to the members'
        ports (after the journal's commit, with one)."""
        with self.lock:
            current = self.gangs.get(gang_id)
            if current is None or current.ports.get(index) is not port:
                return
            replies = current.control.request(index, line)
            written = self._commit(gang_id, current, replies)
        if written is None:
            self._send(gang_id, replies)

    # --- the host's side ---------------------------------------------------------------------

    def member_state(self, gang_id: str, index: int, state: str, host: str | None = None) -> None:
        with self.lock:
            gang = self.gangs.get(gang_id)
            member = gang.control.members.get(index) if gang is not None else None
            if member is not None:
                member.state = state
                if host is not None:
                    member.host = host

    def member_failed(self, gang_id: str, index: int, reason: str) -> None:
        """Member `index` failed (`reason`: e.g. "exit status 1"): every barrier, baton and
        kv wait of its gang is answered with an error naming it, now."""
        with self.lock:
            gang = self.gangs.get(gang_id)
            if gang is None:
                return
            member = gang.control.members.get(index)
            if member is not None:
                member.state = "failed"
            replies = gang.control.fail(index, reason)
            written = self._commit(gang_id, gang, replies)
        if written is None:
            self._send(gang_id, replies)

    def exits_reported(self, gang_id: str) -> dict[int, int]:
        """Member index -> the non-zero exit status its guest's init reported over the port
        (`ended`), in the order the reports came; {} for a gang not open here."""
        with self.lock:
            gang = self.gangs.get(gang_id)
            return dict(gang.control.exit_reported) if gang is not None else {}

    def kv_get(self, gang_id: str, key: str) -> str | None:
        with self.lock:
            return self._gang(gang_id).control.get_key(key)

    def kv_set(self, gang_id: str, key: str, value: str, timeout: float = 30.0) -> None:
        """Set KEY and return once it is in the store (with a journal). ControlError on a
        bad key or value (the message says which bound), or if the store did not take it
        within `timeout` seconds (it is set in memory)."""
        with self.lock:
            gang = self._gang(gang_id)
            try:
                replies = gang.control.set_key(key, value)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            written = self._commit(gang_id, gang, replies)
        if written is None:
            self._send(gang_id, replies)
        elif not written.wait(timeout):
            raise ControlError(f"gang {gang_id}: {key} is set, but not yet in the store after "
                               f"{timeout:g} s")

    def shutdown(self) -> None:
        """The daemon stops: ports closed, state written (not forgotten: the gangs run on
        and a new daemon takes their state up)."""
        with self.lock:
            self.stopping = True
            gangs = list(self.gangs.values())
            self.gangs.clear()
            self.changed.notify_all()
        for gang in gangs:
            for port in gang.ports.values():
                port.close()
        if self.journal is not None:
            self.journal.flush(10.0)
            self.journal.close()

    # --- inside ------------------------------------------------------------------------------

    def _gang(self, gang_id: str) -> _Gang:
        gang = self.gangs.get(gang_id)
        if gang is None:
            raise ControlError(f"job {gang_id} is not a running gang")
        return gang

    def _commit(self, gang_id: str, gang: _Gang, replies: list[Reply]) -> threading.Event | None:
        """Caller holds the lock, having just changed `gang`: queue what changed of its
        durable state, with `replies` to send once it is written. None without a journal
        (the caller sends them itself, after releasing the lock)."""
        if self.journal is None:
            return None
        now = gang.control.durable()
        upserts = {k: v for k, v in now.items() if gang.saved.get(k) != v}
        deletes = gang.saved.keys() - now.keys()
        gang.saved = now
        return self.journal.write(gang_id, upserts, deletes,
                                  lambda: self._send(gang_id, replies))

    def _send(self, gang_id: str, replies: list[Reply]) -> None:
        if not replies:
            return
        with self.lock:
            gang = self.gangs.get(gang_id)
            ports = dict(gang.ports) if gang is not None else {}
            self.changed.notify_all()  # a new wait may have a deadline sooner than the timer's
        for reply in replies:
            port = ports.get(reply.index)
            # a member without a port (moving) asks again and is answered from memory
            if port is None or not port.send(reply.line):
                log.info("gang %s: node%d not attached; its answer waits for it to ask again",
                         gang_id, reply.index)

    def _timer(self) -> None:
        while True:
            expired: list[tuple[str, list[Reply]]] = []
            with self.lock:
                if self.stopping:
                    return
                now = self.clock()
                deadlines = []
                for gang_id, gang in self.gangs.items():
                    replies = gang.control.expire(now)
                    if replies and self._commit(gang_id, gang, replies) is None:
                        expired.append((gang_id, replies))
                    deadline = gang.control.next_deadline()
                    if deadline is not None:
                        deadlines.append(deadline)
                if not expired:  # (with a journal, the expired were queued and sent by it)
                    wait = min(deadlines, default=now + 3600) - now
                    self.changed.wait(max(wait, 0.01))
                    continue
            for gang_id, replies in expired:
                with contextlib.suppress(Exception):
                    self._send(gang_id, replies)
