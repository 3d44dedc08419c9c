"""Gangs' control state in the daemon's store, so that a daemon restart loses none of it.

`ControlJournal` writes what `GangControl.durable` gives (the kv store, baton holders, barrier
rounds, the poison, remembered answers) to the store's `gang_control` table, on one thread
with a connection of its own, in the order the writes were asked for. Each write carries the
replies its change caused and sends them only after its commit: a guest that heard `ok` for a
`kv set` or a `baton take` can rely on it surviving a daemon crash (write-ahead, as a database
acknowledges a commit only once it is on disk).

Why a thread of its own: the hub decides under its lock, and the daemon's lock is taken before
the hub's on other paths (a member's end is recorded under the daemon's lock and tells the
hub). Writing through the daemon's connection under the hub's lock could wait for a
transaction the daemon holds while the daemon waits for the hub. Here the hub only queues.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from vmjobs.control import Rows
from vmjobs.errors import VmjobsError
from vmjobs.store import Store

log = logging.getLogger("vmjobs.control")


class ControlJournal:
    """The writer of `gang_control` rows (see the module doc). Thread-safe: every method only
    queues work for the writer thread, which starts on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.work: queue.SimpleQueue[Callable[[Store | None], None] | None] = queue.SimpleQueue()
        self.started = False
        self.start_lock = threading.Lock()

    def load(self, gang_id: str, timeout: float = 30.0) -> Rows:
        """The gang's rows, in the order they were written; {} for a gang with none.
        Raises VmjobsError if the store cannot be read within `timeout` seconds."""
        result: Future[Rows] = Future()

        def read(store: Store | None) -> None:
            if store is None:
                raise VmjobsError("the state store could not be opened")
            result.set_result(store.gang_control(gang_id))

        self._queue(read, result)
        try:
            return result.result(timeout)
        except TimeoutError:
            raise VmjobsError(f"gang {gang_id}: its control state could not be read "
                              f"within {timeout:g} s") from None

    def write(self, gang_id: str, upserts: Rows, deletes: set[tuple[str, str]],
              then: Callable[[], None]) -> threading.Event:
        """Queue a change of the gang's rows; `then` runs once it is committed (also if the
        write failed: it is logged, and the state is still in memory). The event is set
        after `then` ran."""
        done = threading.Event()

        def apply(store: Store | None) -> None:
            try:
                if store is not None and (upserts or deletes):
                    store.write_gang_control(gang_id, upserts, deletes)
            except Exception as exc:  # noqa: BLE001 - the replies go out whatever happens
                log.warning("gang %s: control state not written (kept in memory): %s",
                            gang_id, exc)
            try:
                then()
            finally:
                done.set()

        self._queue(apply, None)
        return done

    def forget(self, gang_id: str) -> None:
        """Queue the removal of the gang's rows (it ended)."""
        self._queue(lambda store: store and store.forget_gang_control(gang_id), None)

    def forget_except(self, live: set[str]) -> None:
        """Queue the removal of the rows of every gang not in `live` (recovery: gangs that
        ended while no daemon was there to forget them)."""
        def sweep(store: Store | None) -> None:
            if store is None:
                return
            for gang_id in store.gang_control_ids() - live:
                store.forget_gang_control(gang_id)
                log.info("recovery: control state of ended gang %s removed", gang_id)
        self._queue(sweep, None)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written. False if `timeout` passed first."""
        done = threading.Event()
        self._queue(lambda _store: done.set(), None)
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the thread (it is a daemon thread: never waited
        for by the interpreter)."""
        if self.started:
            self.work.put(None)

    def _queue(self, job: Callable[[Store | None], None], result: Future[Rows] | None) -> None:
        with self.start_lock:
            if not self.started:
                self.started = True
                threading.Thread(target=self._run, name="control-journal", daemon=True).start()

        def guarded(store: Store | None) -> None:
            try:
                job(store)
            except Exception as exc:  # noqa: BLE001 - one bad write must not stop the writer
                log.warning("control journal: %s", exc)
                if result is not None and not result.done():
                    result.set_exception(exc)

        self.work.put(guarded)

    def _run(self) -> None:
        store: Store | None = None
        try:
            store = Store(self.path, shared=True)
        except VmjobsError as exc:
            log.warning("control journal: %s; gangs' control state is kept in memory only",
                        exc)
        while True:
            job = self.work.get()
            if job is None:
                break
            job(store)
        if store is not None:
            store.close()

