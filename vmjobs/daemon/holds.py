"""Held reservations at the API (docs/api.md, "Reservations"): `POST /v1/reservations`
(a stream that holds while it is open, unless a duration was given), `POST
/v1/reservations/{id}/release`, and the checks for a job submitted into a reservation.

**Tied to the connection.** A reservation without a duration lives as long as the request
that made it: the answer is an NDJSON stream that reports the reservation's state and, while
nothing changes, a blank line every HEARTBEAT_S. A client that is gone (Ctrl+C, kill -9, its
SSH session closed) makes a write fail, the stream is closed, and closing it releases the
reservation (`Daemon.end_reservation`). A daemon restart cuts every such connection; recovery
then releases those reservations. With a duration the stream ends once the reservation is
held (or gives up), and the reservation lives until its time is over or it is released.

**Keys.** Users act on their own reservations and admins on all, as for jobs; a reservation
made with a key further needs that key, even from its owner or an admin (the key is how a
pipeline hands its hold to its later steps); a wrong or missing key answers 403 with `code:
bad_key`. Only `release --force`, for admins, does without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import placement
from vmjobs import holdkey, holdspec
from vmjobs.codec import allocation_from_dict
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.identity import Caller
from vmjobs.daemon.scheduler import inside_cluster, start_now_or_forget
from vmjobs.daemon.server import ApiError, ApiRequest, Json, Stream
from vmjobs.errors import DoesNotFit, UsageError, VmjobsError
from vmjobs.jobs import UNFINISHED, JobRecord, JobState, Kind, new_reservation_id
from vmjobs.snapshot import describe_allocation

HEARTBEAT_S = 1.0  # a tied reservation's stream writes at least this often (finds a gone client)

Own = Callable[[Caller, str], JobRecord]  # Api._own: the record, if the caller may act on it
View = Callable[[Daemon, JobRecord], dict[str, Any]]  # api.job_view


def key_of(body: dict[str, Any]) -> str | None:
    """The `key` field of a request body, checked (400 `usage` if malformed), removed."""
    key = body.pop("key", None)
    if key is None:
        return None
    try:
        return holdkey.check_key_text(key)
    except VmjobsError as exc:
        raise ApiError(400, str(exc), code="usage") from None


def check_key(reservation_id: str, key: str | None, stored: str | None) -> None:
    """403 `bad_key` unless `key` opens the reservation. Runs scrypt (~50 ms): never under
    the daemon's lock."""
    if not holdkey.key_matches(key, stored):
        raise ApiError(403, holdkey.refusal(reservation_id, key, stored), code=holdkey.BAD_KEY)


class Holds:
    """The reservation endpoints; `own` and `view` are the API's ownership check and job
    view, so a reservation is found, refused and shown exactly as a job is."""

    def __init__(self, daemon: Daemon, own: Own, view: View) -> None:
        self.daemon = daemon
        self.own = own
        self.view = view

    # --- POST /v1/reservations ------------------------------------------------------------

    def reserve(self, req: ApiRequest) -> Json | Stream:
        body = req.json()
        key = key_of(body)
        try:
            spec = holdspec.parse_hold(body)
        except UsageError as exc:
            raise ApiError(400, str(exc), code="usage") from None
        request = spec.request()
        daemon = self.daemon
        if request.host is not None:
            daemon.config.host(request.host)  # unknown host: one line, nothing created
        daemon.refuse_never_fitting(request)
        key_hash = holdkey.hash_key(key) if key is not None else None
        stored = holdspec.to_body(spec)
        stored["tied"] = spec.time_limit is None
        if spec.wait_timeout is not None:
            stored["wait_deadline"] = time.time() + spec.wait_timeout
        record = JobRecord(id=new_reservation_id(), owner=req.caller.name, uid=req.caller.uid,
                           state=JobState.QUEUED, spec=stored, kind=Kind.RESERVATION)
        with daemon.lock:
            daemon.store.submit(record, request, f"reservation asked for by {req.caller.name}",
                                key_hash)
            if spec.no_wait:
                why = start_now_or_forget(daemon, record.id)
                if why is not None:
                    raise ApiError(409, f"cannot hold now (--no-wait): {why}",
                                   code="not_started")
            daemon.wake()
        return Stream(_Started(self._follow(record.id, bool(stored["tied"]))),
                      content_type="application/x-ndjson")

    def _follow(self, reservation_id: str, tied: bool) -> Generator[bytes, None, None]:
        """The reservation's view on every change of its state or place in line, a blank line
        at least every HEARTBEAT_S; ends once it is held (with a duration) or has ended.
        Closed early (the client is gone, the write failed): the reservation is withdrawn or
        released, unless it was handed over to its duration."""
        daemon = self.daemon
        handed_over = False
        try:
            last: tuple[Any, ...] | None = None
            wrote = 0.0
            while True:
                with daemon.lock:
                    record = daemon.store.job(reservation_id)
                    if record is None:  # --no-wait's row forgotten: nothing to release
                        handed_over = True
                        return
                    view = self.view(daemon, record)
                    stopping = daemon.stopping
                now = time.monotonic()
                seen = (view["state"], view["position"], view["waiting_because"])
                if seen != last:
                    yield (json.dumps(view) + "\n").encode()
                    last, wrote = seen, now
                elif now - wrote >= HEARTBEAT_S:
                    yield b"\n"
                    wrote = now
                if record.state.finished or (record.state == JobState.HELD and not tied) \
                        or stopping:
                    # ended; or lives on by its duration; or the daemon stops (recovery
                    # releases a tied one at the next start)
                    handed_over = True
                    return
                with daemon.lock:
                    daemon.changed.wait(HEARTBEAT_S)
        finally:
            if not handed_over:
                daemon.end_reservation(reservation_id, JobState.RELEASED,
                                       "its client's connection closed")

    # --- POST /v1/reservations/{id}/release -------------------------------------------------

    def release(self, req: ApiRequest) -> Json:
        body = req.json()
        key = key_of(body)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(400, "force must be true or false", code="usage")
        who = req.caller
        daemon = self.daemon
        with daemon.lock:
            record = self.reservation(who, req.params["id"])
            if record.state.finished:
                raise ApiError(409, f"reservation {record.id} already ended: "
                                    f"{record.state.value}")
            stored = daemon.store.key_hash(record.id)
        if force:
            if not who.admin:
                raise ApiError(403, "release --force is for administrators (root or the "
                                    f"admin group); you are {who.name}")
        else:
            check_key(record.id, key, stored)
        how = f"released by {who.name}" + (" (--force)" if force else "")
        daemon.end_reservation(record.id, JobState.RELEASED, how)
        with daemon.lock:
            # another caller may be ending it: wait for its end, bounded
            daemon.changed.wait_for(lambda: _ended(daemon, record.id), 150.0)
            final = daemon.store.job(record.id)
            assert final is not None
            return Json(self.view(daemon, final))

    def reservation(self, who: Caller, name: str) -> JobRecord:
        """The reservation `name` (id or unique prefix) if the caller may act on it; 409 for
        a job. Caller holds the lock."""
        record = self.own(who, name)
        if record.kind != Kind.RESERVATION:
            raise ApiError(409, f"{record.id} is a job, not a reservation (use 'vmjob cancel')")
        return record

    # --- a job submitted into a reservation -------------------------------------------------

    def admit(self, who: Caller, name: str, key: str | None,
              request: placement.Request) -> str:
        """The reservation a job may be submitted into: the caller's own (an admin's: any),
        HELD and not being released, opened by `key`, and with room for `request` when empty.
        Returns its whole id. Raises ApiError (403 `bad_key`, 409) or DoesNotFit."""
        if request.host is not None or request.pool is not None:
            raise ApiError(400, "--host and --pool do not go with --reservation: the job runs "
                                "where the reservation holds", code="usage")
        daemon = self.daemon
        with daemon.lock:
            record = self.reservation(who, name)
            if record.state != JobState.HELD or record.id in daemon.releasing:
                state = "being released" if record.id in daemon.releasing \
                    else record.state.value
                raise ApiError(409, f"reservation {record.id} is not held ({state})")
            stored = daemon.store.key_hash(record.id)
        check_key(record.id, key, stored)
        with daemon.lock:
            cluster = inside_cluster(daemon, record)
            for job_id in list(cluster.allocations()):
                cluster.release(job_id)
            if not cluster.ever_fits(request):
                assert record.allocation is not None
                held = describe_allocation(allocation_from_dict(record.allocation))
                raise DoesNotFit(f"the job does not fit inside reservation {record.id} ({held}) "
                                 f"even when nothing else runs in it: "
                                 f"{cluster.explain(request).summary}")
        return record.id

    def inside_view(self, reservation_id: str) -> list[dict[str, Any]]:
        """The jobs inside a reservation, unfinished first. Caller holds the lock."""
        records = self.daemon.store.inside(reservation_id)
        records.sort(key=lambda r: (r.state not in UNFINISHED, r.created))
        return [{"id": r.id, "state": r.state.value, "owner": r.owner,
                 "argv": r.spec.get("argv"), "cpus": (r.allocation or {}).get("cpus")}
                for r in records]


class _Started:
    """A stream's chunks from a generator started at once: its first chunk is read here, so
    the generator is inside its `try` and closing this (the server always does, even when
    the answer could not be sent at all) runs its `finally` — for a reservation, the release.
    An unstarted generator's `close()` would run nothing."""

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._first: bytes | None = next(chunks, None)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()


def _ended(daemon: Daemon, reservation_id: str) -> bool:
    record = daemon.store.job(reservation_id)
    return record is None or (record.state.finished and reservation_id not in daemon.releasing)
