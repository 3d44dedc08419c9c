"""The endpoints (documented in docs/api.md): who may do what, and the JSON they answer.

Ownership is checked here, once per request, against the uid the socket reported: users see
and act on their own jobs; root and the admin group on all. A job that is not yours answers
403 with one line naming its owner — job ids are random, so naming the owner leaks nothing
that `vmjob list` hides.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import placement
from placement.gang import apart_groups, gang_never_fits, with_groups
from vmjobs import __version__, gang, pools_view, usage
from vmjobs.config import system_warnings
from vmjobs.controlhub import ControlError
from vmjobs.daemon import attach, gangwire, lending, logs, moves
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.holds import Holds, key_of
from vmjobs.daemon.identity import Caller, denial, may_act
from vmjobs.daemon.moves import MoveResult
from vmjobs.daemon.scheduler import start_now_or_forget
from vmjobs.daemon.server import ApiError, ApiRequest, Json, Router, Stream, Upgrade
from vmjobs.daemon.submission import parse
from vmjobs.daemon.uploads import Limits, Uploads
from vmjobs.errors import DoesNotFit, NotFound, UsageError, VmjobsError
from vmjobs.guest import JobFiles, output_size
from vmjobs.hosts_view import HostView
from vmjobs.image import resolve_image
from vmjobs.jobarray import KEY_ID, KEY_INDEX, member_id, member_spec
from vmjobs.jobs import ACTIVE, UNFINISHED, JobRecord, JobState, Kind, new_job_id
from vmjobs.profiles import listing as profile_listing
from vmjobs.profiles import usage_context
from vmjobs.spec import Spec, time_limit_of, wait_timeout_of

CANCEL_SETTLE_S = 30.0  # how long `cancel` waits for the guest to be gone before answering
MAX_CANCEL_NAMES = 10_000  # job and array ids in one cancel call
WAIT_MAX_S = 3600.0
AMBIGUOUS_SHOWN = 5  # candidates named when a job id prefix matches several jobs
_ID_PREFIX = re.compile(r"[0-9A-Za-z_.-]{1,64}")  # what a job id is made of (hex today)


def job_view(daemon: Daemon, record: JobRecord, started: float | None = None) -> dict[str, Any]:
    """A job as the API shows it. Caller holds the daemon's lock."""
    spec = record.spec
    view: dict[str, Any] = {
        "id": record.id, "name": spec.get("name"), "owner": record.owner, "uid": record.uid,
        "state": record.state.value, "host": record.host, "exit_code": record.exit_code,
        "message": record.message, "created": record.created, "updated": record.updated,
        "started": started, "argv": spec.get("argv"), "env": spec.get("env") or {},
        "image": spec.get("image"), "request": record.request,
        "time_limit": time_limit_of(spec), "wait_timeout": wait_timeout_of(spec),
        "output": spec.get("output"), "allocation": record.allocation,
        "position": None, "line": None, "waiting_because": None,
        "array": spec.get(KEY_ID), "array_index": spec.get(KEY_INDEX),
        "gang_id": spec.get(gang.KEY_ID), "gang_index": spec.get(gang.KEY_INDEX),
        "gang_size": spec.get(gang.KEY_SIZE),
        # a held reservation (kind "reservation"): held until `until` (None: while its
        # client's connection lasts, `tied`); a job run inside one names it in `reservation`
        "kind": record.kind.value, "reservation": record.inside,
        "profile": spec.get("profile"), "stdin": spec.get("stdin"),
    }
    # borrowing (docs/borrowing.md): the cores it runs on by loan, or lends
    view["loans"] = [{"host": loan.host, "cpu": loan.cpu, "owner": loan.owner,
                      "borrower": loan.borrower} for loan in daemon.store.loans(record.id)]
    view["borrow"] = bool(spec.get("borrow"))
    view["no_lend"] = bool(spec.get("no_lend"))
    if record.kind == Kind.RESERVATION:
        view["until"] = spec.get("until")
        view["tied"] = bool(spec.get("tied"))
    use = daemon.sampler.used(record.id)
    view["cpu_used_cores"] = None if use is None else round(use.cores, 3)
    view["cpu_used_over_s"] = None if use is None else round(use.over_s, 1)
    # memory (its guest's balloon, daemon/memuse.py) and memory loans (borrow.memory: balloon)
    view["memory_loans"] = [{"host": m.host, "node": m.node, "mib": m.mib, "owner": m.owner,
                             "borrower": m.borrower}
                            for m in daemon.store.memory_loans(record.id)]
    reading = daemon.sampler.memory.latest(record.id)
    view["memory_used_mib"] = None if reading is None or reading.used_kib is None \
        else reading.used_kib >> 10
    view["memory_resident_mib"] = None if reading is None or reading.resident_kib is None \
        else reading.resident_kib >> 10
    wait = daemon.waits.get(record.id)
    if record.state == JobState.QUEUED and wait is not None:
        view["position"] = wait.position
        view["line"] = wait.line  # the pool whose line `position` counts in
        view["waiting_because"] = wait.reason
    return view


class Api:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        config = daemon.config
        self.uploads = Uploads(config.spool, Limits(
            user_quota_bytes=config.user_spool_quota_mib << 20,
            min_free_bytes=config.spool_min_free_mib << 20, ttl_s=config.upload_ttl_s,
        ), self._unfinished_dirs)
        self.holds = Holds(daemon, self._own, job_view)

    def routes(self) -> Router:
        router = Router()
        router.add("GET", "/v1/status", self.status)
        router.add("GET", "/v1/hosts", self.hosts)
        router.add("GET", "/v1/jobs", self.list_jobs)
        router.add("POST", "/v1/jobs", self.submit)
        router.add("GET", "/v1/jobs/{id}", self.show)
        router.add("POST", "/v1/jobs/{id}/cancel", self.cancel)
        router.add("POST", "/v1/cancel", self.cancel_many)
        router.add("GET", "/v1/jobs/{id}/wait", self.wait)
        router.add("GET", "/v1/jobs/{id}/logs", self.logs)
        router.add("POST", "/v1/jobs/{id}/console", self.console)
        router.add("GET", "/v1/jobs/{id}/output", self.output)
        router.add("POST", "/v1/uploads", self.upload)
        router.add("POST", "/v1/wake", self.wake)
        router.add("POST", "/v1/jobs/{id}/migrate", self.migrate)
        router.add("POST", "/v1/jobs/{id}/checkpoint", self.checkpoint)
        router.add("POST", "/v1/jobs/{id}/restore", self.restore)
        router.add("POST", "/v1/jobs/{id}/resize", self.resize)
        router.add("POST", "/v1/hosts/{host}/drain", self.drain)
        router.add("POST", "/v1/hosts/{host}/uncordon", self.uncordon)
        router.add("POST", "/v1/rebalance", self.rebalance)
        router.add("GET", "/v1/usage", self.usage)
        router.add("GET", "/v1/profiles", self.profiles)
        router.add("GET", "/v1/pools", self.pools)
        router.add("GET", "/v1/pools/{name}", self.pools)
        router.add("POST", "/v1/reservations", self.holds.reserve)
        router.add("POST", "/v1/reservations/{id}/release", self.holds.release)
        router.add("GET", "/v1/jobs/{id}/kv", self.kv_get)
        router.add("POST", "/v1/jobs/{id}/kv", self.kv_set)
        return router

    # --- helpers ----------------------------------------------------------------------------

    def _unfinished_dirs(self, uid: int) -> list[Any]:
        """The spool directories of `uid`'s jobs that have not ended (charged to its quota)."""
        with self.daemon.lock:
            records = self.daemon.store.in_states(UNFINISHED, uid)
        return [JobFiles.of(self.daemon.config.spool, r.id).dir for r in records]

    def _own(self, who: Caller, job_id: str) -> JobRecord:
        """The job, if the caller may act on it: a whole id, or a unique prefix of one (like
        git's and docker's short ids). Caller holds the daemon's lock."""
        record = self.daemon.store.job(job_id) or self._by_prefix(who, job_id)
        if record is None:
            raise ApiError(404, f"no job {job_id}")
        if not may_act(who, record):
            raise ApiError(403, denial(who, record))
        return record

    def _by_prefix(self, who: Caller, prefix: str) -> JobRecord | None:
        """The one job whose id starts with `prefix`, among the caller's own jobs (an admin's:
        everyone's), so another user's job never makes a user's prefix ambiguous. Raises
        ApiError 400 (`code: ambiguous`) naming a few candidates when several match."""
        if not _ID_PREFIX.fullmatch(prefix):
            return None
        ids = self.daemon.store.ids_with_prefix(prefix, None if who.admin else who.uid,
                                                limit=AMBIGUOUS_SHOWN + 1)
        if len(ids) > 1:
            more = ", ..." if len(ids) > AMBIGUOUS_SHOWN else ""
            raise ApiError(400, f"job id prefix {prefix!r} is ambiguous: it matches "
                                f"{', '.join(ids[:AMBIGUOUS_SHOWN])}{more} (give more of the "
                                "id)", code="ambiguous")
        return self.daemon.store.job(ids[0]) if ids else None

    # --- endpoints --------------------------------------------------------------------------

    def status(self, req: ApiRequest) -> Json:
        daemon = self.daemon
        with daemon.lock:
            queued = daemon.store.count_in(frozenset({JobState.QUEUED}))
            running = daemon.store.count_in(ACTIVE)
            unreachable = daemon.store.count_in(frozenset({JobState.UNREACHABLE}))
            recent = [[round(t * 1000, 3), n] for t, n in daemon.scheduler.recent]
        return Json({
            "version": __version__, "pid": os.getpid(), "socket": str(daemon.config.socket),
            "queued": queued, "active": running, "unreachable": unreachable,
            "hosts": {h.name: daemon.hosts.is_up(h.name) for h in daemon.config.hosts},
            "scheduler": {"running": daemon.scheduler.running,
                          "failed_passes": daemon.scheduler.failed_passes,
                          "last_failure": daemon.scheduler.last_failure,
                          "passes": daemon.scheduler.passes,
                          "recent_passes": recent},
            "you": {"uid": req.caller.uid, "name": req.caller.name, "admin": req.caller.admin},
            "warnings": system_warnings(daemon.config),
        })

    def hosts(self, _req: ApiRequest) -> Json:
        daemon = self.daemon
        with daemon.lock:
            cluster = daemon.live.cluster()
            views = []
            for host in daemon.config.hosts:
                usage = cluster.free(host.name) if host.name in cluster.hosts else None
                loans = tuple(loan for loan in daemon.store.loans() if loan.host == host.name)
                views.append(HostView(host.name, host.uri, usage, daemon.hosts.error(host.name),
                                      tuple(daemon.hosts.warnings(host.name)),
                                      host.pools, loans).to_dict())
        return Json(views)

    def list_jobs(self, req: ApiRequest) -> Json:
        """Visible jobs: queued and running ones; with ?all=1 finished ones too."""
        include_finished = req.flag("all")
        daemon = self.daemon
        uid = None if req.caller.admin else req.caller.uid
        with daemon.lock:
            # without ?all, only the unfinished jobs are read (an index), not the whole history
            records = daemon.store.jobs(uid) if include_finished else \
                daemon.store.in_states(UNFINISHED, uid)
            started = daemon.store.started_at([r.id for r in records])
            # a gang is one line: its view (members inside), where its first member was
            views, gangs = [], set()
            for r in records:
                ref = gang.gang_of(r.spec)
                if ref is None:
                    views.append(job_view(daemon, r, started.get(r.id)))
                elif ref.gang_id not in gangs:
                    gangs.add(ref.gang_id)
                    views.append(self._gang_view(ref.gang_id))
        views.sort(key=lambda v: (v["position"] is None, v["position"] or 0, v["created"]))
        return Json(views)

    def show(self, req: ApiRequest) -> Json:
        daemon = self.daemon
        with daemon.lock:
            if (gang_id := self._gang_or_none(req.caller, req.params["id"])) is not None:
                return Json(self._gang_view(gang_id, events=True))
            record = self._own(req.caller, req.params["id"])
            view = job_view(daemon, record, daemon.store.started_at().get(record.id))
            if record.kind == Kind.RESERVATION:
                view["jobs"] = self.holds.inside_view(record.id)
            view["events"] = _events(daemon, record.id)
        return Json(view)

    def submit(self, req: ApiRequest) -> Json:
        body = req.json()
        # a job run inside a held reservation: its id and key (never stored with the spec)
        inside, key = body.pop("reservation", None), key_of(body)
        if inside is not None and not (isinstance(inside, str) and inside):
            raise ApiError(400, "reservation must be a reservation id", code="usage")
        try:
            submission = parse(body, self.daemon.config.profiles)
        except UsageError as exc:
            raise ApiError(400, str(exc), code="usage") from None
        request = submission.request()
        daemon = self.daemon
        config = daemon.config
        config.refuse_unknown(request.host, request.pool)  # one line, nothing created
        image = resolve_image(config.spool, submission.image)
        if inside is not None:
            if submission.array is not None or submission.nodes is not None:
                raise ApiError(400, "--array and --nodes do not go with --reservation yet",
                               code="usage")
            inside = self.holds.admit(req.caller, inside, key, request)
        elif key is not None:
            raise ApiError(400, "a key (--key) goes with --reservation only", code="usage")
        elif submission.nodes is None:  # a gang's members are checked together
            daemon.refuse_never_fitting(request)
        job_id = new_job_id()
        if submission.nodes is not None:
            return self._submit_gang(req.caller, submission, job_id, image.id)
        if submission.array is not None:
            return self._submit_array(req.caller, submission, job_id, request,
                                      _spec(submission, image.id))
        files = JobFiles.of(config.spool, job_id)
        if submission.input is not None:
            self.uploads.take(submission.input, req.caller.uid, files.dir / "input")
        record = JobRecord(id=job_id, owner=req.caller.name, uid=req.caller.uid,
                           state=JobState.QUEUED, spec=_spec(submission, image.id),
                           inside=inside)
        with daemon.lock:
            daemon.store.submit(record, request, f"submitted by {req.caller.name}")
            if submission.no_wait:
                return self._start_now_or_forget(record)
            daemon.wake()
            stored = daemon.store.job(job_id)
            assert stored is not None
            return Json(job_view(daemon, stored), status=201)

    def _submit_array(self, who: Caller, submission: Spec, array_id: str,
                      request: placement.Request, spec: dict[str, Any]) -> Json:
        """One job per index, `ARRAY_INDEX`, all queued in one transaction (all or none)."""
        daemon = self.daemon
        array = submission.array
        assert array is not None
        records = [JobRecord(id=member_id(array_id, i), owner=who.name, uid=who.uid,
                             state=JobState.QUEUED,
                             spec=member_spec(spec, array_id, i, array.limit))
                   for i in array.indices]
        self._take_input(who, submission, records)
        reason = f"submitted by {who.name} (array {array_id}, {len(records)} jobs)"
        with daemon.lock:
            with daemon.store.reserving():
                for record in records:
                    daemon.store.add_job(record, request, None, reason)
            daemon.wake()
            views = []
            for record in records:
                stored = daemon.store.job(record.id)
                assert stored is not None
                views.append(job_view(daemon, stored))
        return Json({"array": array_id, "jobs": views}, status=201)

    def _take_input(self, who: Caller, submission: Spec, records: list[JobRecord]) -> None:
        """The submission's upload into the first job's directory, a copy for each other
        (an array's jobs, a gang's members)."""
        if submission.input is None:
            return
        spool = self.daemon.config.spool
        first = JobFiles.of(spool, records[0].id).dir / "input"
        self.uploads.take(submission.input, who.uid, first)
        for record in records[1:]:
            shutil.copytree(first, JobFiles.of(spool, record.id).dir / "input", symlinks=True)

    def _submit_gang(self, who: Caller, submission: Spec, gang_id: str, image_id: str) -> Json:
        """A gang: one job per member, `GANG.i`, all queued in one transaction (all or none);
        members kept apart carry their anti-affinity group in their stored request."""
        daemon = self.daemon
        config = daemon.config
        specs = submission.members()
        groups = apart_groups(gang_id, len(specs), submission.host_limit())
        requests = with_groups([m.request() for m in specs], groups)
        for request in requests:
            if request.host is not None:
                config.host(request.host)  # unknown host: one line, nothing created
        with daemon.lock:
            why = gang_never_fits(daemon.live.cluster(), requests)
        if why is not None:
            raise DoesNotFit(f"the gang can never start: {why}")
        records = [JobRecord(id=gang.member_id(gang_id, i), owner=who.name, uid=who.uid,
                             state=JobState.QUEUED,
                             spec=gang.member_spec(_spec(m, image_id), gang_id, i, len(specs),
                                                   submission.on_member_failure))
                   for i, m in enumerate(specs)]
        self._take_input(who, submission, records)
        reason = f"submitted by {who.name} (gang {gang_id}, member of {len(records)})"
        with daemon.lock:
            with daemon.store.reserving():
                for record, request in zip(records, requests, strict=True):
                    daemon.store.add_job(record, request, None, reason)
            if submission.no_wait:  # all members start in this pass, or none exists
                why = start_now_or_forget(daemon, *(r.id for r in records))
                if why is not None:
                    raise ApiError(409, f"cannot start now (--no-wait): {why}",
                                   code="not_started")
            else:
                daemon.wake()
            return Json(self._gang_view(gang_id), status=201)

    def _gang_view(self, gang_id: str, events: bool = False) -> dict[str, Any]:
        """A gang as the API shows it: a job's fields (`id`, `state`, `exit_code`, `message`,
        `finished`) from its members' (`gang.outcome`), and `members`: each member's view.
        Caller holds the daemon's lock."""
        daemon = self.daemon
        records = gang.member_records(daemon.store, gang_id)
        started = daemon.store.started_at([r.id for r in records])
        views = [job_view(daemon, r, started.get(r.id)) for r in records]
        if events:
            for view in views:
                view["events"] = _events(daemon, view["id"])
        members = [gang.as_member(r) for r in records]
        result = gang.outcome(members, {r.id: r.updated for r in records})
        first = records[0]
        ref = gang.gang_of(first.spec)
        assert ref is not None
        starts = list(started.values())
        request = dict(views[0]["request"] or {})
        for key in ("cpus", "memory_mib", "nics"):  # the gang's whole size
            request[key] = sum((v["request"] or {}).get(key, 0) for v in views)
        hosts = [r.host for r in records]
        return {
            "id": gang_id, "gang": True, "nodes": len(records), "name": first.spec.get("name"),
            "owner": first.owner, "uid": first.uid, "state": result.state.value,
            "finished": result.finished, "exit_code": result.exit_code,
            "message": result.message, "on_member_failure": ref.on_failure,
            "failed_member": result.failed.job_id if result.failed else None,
            "created": first.created, "updated": max(r.updated for r in records),
            "started": min(starts) if len(starts) == len(records) else None,
            "hosts": hosts, "request": request,
            "host": ",".join(sorted({h for h in hosts if h})) or None,
            "position": views[0]["position"], "line": views[0].get("line"),
            "waiting_because": views[0]["waiting_because"],
            "time_limit": views[0]["time_limit"], "output": None, "argv": None,
            "members": views,
        }

    def _gang_or_none(self, who: Caller, name: str) -> str | None:
        """`name` as a gang's id the caller may act on, or None if no gang has that id.
        Caller holds the lock."""
        records = gang.member_records(self.daemon.store, name)
        if not records:
            return None
        if not may_act(who, records[0]):
            raise ApiError(403, denial(who, records[0]))
        return name

    def _start_now_or_forget(self, record: JobRecord) -> Json:
        """--no-wait: run the scheduling pass here; if it does not place the job, it never
        existed. Caller holds the daemon's lock."""
        daemon = self.daemon
        why = start_now_or_forget(daemon, record.id)
        if why is not None:
            raise ApiError(409, f"cannot start now (--no-wait): {why}", code="not_started")
        stored = daemon.store.job(record.id)
        assert stored is not None
        return Json(job_view(daemon, stored), status=201)

    def cancel(self, req: ApiRequest) -> Json:
        daemon = self.daemon
        with daemon.lock:
            if (gang_id := self._gang_or_none(req.caller, req.params["id"])) is not None:
                return self._cancel_gang(req.caller, gang_id)
            record = self._own(req.caller, req.params["id"])
            job_id = record.id
            if record.kind == Kind.RESERVATION:
                raise ApiError(409, f"{job_id} is a reservation: release it with 'vmjob "
                                    f"release {job_id}'")
            if record.state.finished:
                raise ApiError(409, f"job {job_id} already ended: {record.state.value}")
        daemon.stop(job_id, JobState.CANCELLED, f"cancelled by {req.caller.name}")
        with daemon.lock:
            daemon.changed.wait_for(lambda: _finished(daemon, job_id)
                                    or job_id in daemon.unrecorded, CANCEL_SETTLE_S)
            pending = daemon.unrecorded.get(job_id)
            if pending is not None:
                raise ApiError(503, f"job {job_id}: its guest was stopped but the end could "
                                    f"not be recorded ({pending.error}); the daemon records "
                                    "it once the spool has room")
            final = daemon.store.job(job_id)
            assert final is not None
            return Json(job_view(daemon, final))

    def _cancel_gang(self, who: Caller, gang_id: str) -> Json:
        """Cancel every unfinished member; answers with the gang once they have ended.
        Caller holds the lock (released while guests are destroyed)."""
        daemon = self.daemon
        reason = f"cancelled by {who.name}"
        ids = [r.id for r in gang.member_records(daemon.store, gang_id)
               if not r.state.finished]
        if not ids:
            raise ApiError(409, f"gang {gang_id} already ended")
        later = daemon.stop_without_guest(ids, JobState.CANCELLED, reason)
        daemon.lock.release()
        try:
            for job_id in later:
                daemon.stop(job_id, JobState.CANCELLED, reason)
        finally:
            daemon.lock.acquire()
        daemon.changed.wait_for(lambda: all(_finished(daemon, j) for j in ids),
                                CANCEL_SETTLE_S)
        return Json(self._gang_view(gang_id))

    def cancel_many(self, req: ApiRequest) -> Json:
        """Cancel many jobs in one call: named jobs and arrays (`jobs`), and/or every job of
        the caller's (an admin's: anyone's) that matches the filters (`states`, `user`).
        Selected and stopped under one lock hold; answers once all have ended (or after
        CANCEL_SETTLE_S), with what each became and one line per job it could not cancel."""
        try:
            query = cancel_query(req.json())
        except UsageError as exc:
            raise ApiError(400, str(exc), code="usage") from None
        who = req.caller
        if query.user is not None and query.user != who.name and not who.admin:
            raise ApiError(403, f"only administrators may cancel other users' jobs; you are "
                                f"{who.name}")
        daemon = self.daemon
        reason = f"cancelled by {who.name}"
        with daemon.lock:
            chosen, errors = self._select(who, query)
            later = daemon.stop_without_guest([r.id for r in chosen], JobState.CANCELLED,
                                              reason)
        for job_id in later:  # guests to destroy: seconds each, not under the lock
            daemon.stop(job_id, JobState.CANCELLED, reason)
        ids = [r.id for r in chosen]
        with daemon.lock:
            daemon.changed.wait_for(lambda: all(_finished(daemon, j) or j in daemon.unrecorded
                                                for j in ids), CANCEL_SETTLE_S)
            done = []
            for job_id in ids:
                record = daemon.store.job(job_id)
                state = record.state.value if record is not None else "gone"
                pending = daemon.unrecorded.get(job_id)
                if pending is not None:
                    errors.append({"id": job_id, "error": f"job {job_id}: its guest was stopped "
                                   f"but the end could not be recorded ({pending.error})"})
                done.append({"id": job_id, "state": state})
        return Json({"cancelled": done, "errors": errors, "matched": len(ids)})

    def _select(self, who: Caller, query: CancelQuery) -> tuple[list[JobRecord],
                                                                list[dict[str, str]]]:
        """The unfinished jobs the query names and may cancel, and a line for each named job
        it may not. Caller holds the lock."""
        store = self.daemon.store
        errors: list[dict[str, str]] = []
        if query.jobs:
            found: list[JobRecord] = []
            for name in query.jobs:
                record = store.job(name)
                members = [record] if record is not None else \
                    (store.array_members(name) or gang.member_records(store, name))
                if not members:  # a unique prefix of a job id (ambiguous: 400, the lot)
                    record = self._by_prefix(who, name)
                    members = [record] if record is not None else []
                if not members:
                    errors.append({"id": name, "error": f"no job {name}"})
                    continue
                mine = [r for r in members if may_act(who, r)]
                if not mine:
                    errors.append({"id": name, "error": denial(who, members[0])})
                    continue
                if record is not None and record.state.finished:
                    errors.append({"id": name, "error": f"job {name} already ended: "
                                                        f"{record.state.value}"})
                found.extend(mine)
        else:
            # a user's filters apply to the user's own jobs, an admin's to everyone's
            found = [r for r in store.in_states(query.states or UNFINISHED)
                     if may_act(who, r)]
        chosen, seen = [], set()
        for record in found:
            if record.kind == Kind.RESERVATION:  # released, never cancelled
                if query.jobs and record.id in query.jobs:
                    errors.append({"id": record.id, "error": f"{record.id} is a reservation: "
                                   f"release it with 'vmjob release {record.id}'"})
                continue
            if record.id in seen or record.state.finished:
                continue
            if query.states and record.state not in query.states:
                continue
            if query.user is not None and record.owner != query.user:
                continue
            seen.add(record.id)
            chosen.append(record)
        return chosen, errors

    def wait(self, req: ApiRequest) -> Json:
        """Long poll: answers when the job has ended, or after ?timeout= seconds."""
        daemon = self.daemon
        # 0 answers at once (a poll); absent means the longest wait
        timeout = req.number("timeout", 0.0, WAIT_MAX_S)
        if timeout is None:
            timeout = WAIT_MAX_S
        with daemon.lock:
            if (gang_id := self._gang_or_none(req.caller, req.params["id"])) is not None:
                daemon.changed.wait_for(lambda: self._gang_view(gang_id)["finished"]
                                        or daemon.stopping, timeout)
                return Json(self._gang_view(gang_id))
            job_id = self._own(req.caller, req.params["id"]).id
            daemon.changed.wait_for(lambda: _finished(daemon, job_id) or daemon.stopping,
                                    timeout)
            record = daemon.store.job(job_id)
            assert record is not None
            view = job_view(daemon, record, daemon.store.started_at().get(job_id))
        view["finished"] = record.state.finished
        return Json(view)

    def logs(self, req: ApiRequest) -> Stream:
        """The job's output; ?offset=N skips the first N bytes (a client that reconnects
        after a daemon restart asks for what it has not had yet)."""
        offset = req.number("offset", 0, 2**63) or 0
        if offset != int(offset):
            raise ApiError(400, f"offset must be a whole number of bytes, not {offset:g}")
        with self.daemon.lock:
            if (gang_id := self._gang_or_none(req.caller, req.params["id"])) is not None:
                size = len(gang.member_records(self.daemon.store, gang_id))
                raise ApiError(400, f"{gang_id} is a gang of {size}: name a member, "
                                    f"{gang_id}.0 .. {gang_id}.{size - 1}")
            record = self._own(req.caller, req.params["id"])
        return Stream(logs.stream(self.daemon, record.id, req.flag("follow"), int(offset)))

    def console(self, req: ApiRequest) -> Upgrade:
        """The job's console: its live output and, with ?input=1, the caller's input to an
        interactive job (`daemon/attach.py`). ?from=end starts at the output's current end
        (`vmjob attach`), else at its beginning."""
        with_input = req.flag("input")
        start = req.query.get("from", "start")
        if start not in ("start", "end"):
            raise ApiError(400, f"query parameter from={start[:20]!r} must be start or end")
        with self.daemon.lock:
            record = self._own(req.caller, req.params["id"])
            if record.state.finished:
                raise ApiError(409, f"job {record.id} has ended ({record.state.value})",
                               "finished")
            if with_input and not record.spec.get("stdin"):
                raise ApiError(409, f"job {record.id} takes no input: it was not started "
                                    "with 'vmjob run -i' or 'vmjob shell'", "no_input")
        offset = output_size(JobFiles.of(self.daemon.config.spool, record.id)) \
            if start == "end" else 0
        return Upgrade(attach.PROTOCOL, attach.session(self.daemon, record.id, with_input,
                                                       offset))

    def output(self, req: ApiRequest) -> Stream:
        with self.daemon.lock:
            record = self._own(req.caller, req.params["id"])
        if not record.state.finished:
            raise ApiError(409, f"job {record.id} has not ended yet ({record.state.value})")
        out = JobFiles.of(self.daemon.config.spool, record.id).out
        if not out.is_dir():
            raise NotFound(f"job {record.id} left no output")
        return Stream(_tar_stream(out), content_type="application/x-tar")

    def wake(self, _req: ApiRequest) -> Json:
        """Anyone may ask for a scheduling pass (a direct `vmjob run` freed cores): it only
        makes the scheduler look again."""
        self.daemon.wake()
        return Json({"woken": True})

    # --- moving jobs (progress streams: one JSON object a line, the last one the result) ----

    def _admin(self, req: ApiRequest, what: str) -> None:
        if not req.caller.admin:
            raise ApiError(403, f"{what} is for administrators (root or the admin group); "
                                f"you are {req.caller.name}")

    def migrate(self, req: ApiRequest) -> Stream:
        body = req.json()
        with self.daemon.lock:
            record = self._own(req.caller, req.params["id"])
        to = _opt_str(body, "to")
        if to is not None:
            self.daemon.config.host(to)
        policy = moves.policy_for(
            self.daemon, max_downtime_ms=_opt_int(body, "max_downtime_ms"),
            bandwidth_mib_s=_opt_int(body, "bandwidth_mib_s"),
            auto_converge=_opt_bool(body, "auto_converge"), postcopy=_opt_bool(body, "postcopy"),
            timeout_s=_opt_number(body, "timeout_s"))
        replug_nics = bool(_opt_bool(body, "replug_nics"))
        return progress_stream(lambda emit: [moves.migrate(
            self.daemon, record.id, to, policy,
            on_progress=lambda p: emit({"progress": migration_progress(p)}),
            note=lambda m: emit({"note": m}), replug_nics=replug_nics)])

    def checkpoint(self, req: ApiRequest) -> Stream:
        """A job's, or a gang's: every member saved, or none."""
        with self.daemon.lock:
            if (gang_id := self._gang_or_none(req.caller, req.params["id"])) is not None:
                return progress_stream(lambda _emit: moves.checkpoint_gang(self.daemon, gang_id))
            record = self._own(req.caller, req.params["id"])
        return progress_stream(lambda _emit: [moves.checkpoint_job(self.daemon, record.id)])

    def restore(self, req: ApiRequest) -> Stream:
        """`to`: a host; for a gang, one host per member in index order, comma-separated."""
        to = _opt_str(req.json(), "to")
        with self.daemon.lock:
            gang_id = self._gang_or_none(req.caller, req.params["id"])
            record = self._own(req.caller, req.params["id"]) if gang_id is None else None
            size = len(gang.member_records(self.daemon.store, gang_id)) if gang_id else 0
        if gang_id is not None:
            hosts = to.split(",") if to is not None else None
            if hosts is not None and len(hosts) != size:
                raise ApiError(400, f"gang {gang_id} has {size} members: give --to one host "
                                    f"per member, comma-separated ({len(hosts)} given)",
                               code="usage")
            for host in hosts or ():
                self.daemon.config.host(host)
            return progress_stream(lambda _emit: moves.restore_gang(self.daemon, gang_id,
                                                                    hosts))
        assert record is not None
        if to is not None:
            self.daemon.config.host(to)
        return progress_stream(lambda _emit: [moves.restore(self.daemon, record.id, to)])

    def resize(self, req: ApiRequest) -> Stream:
        """Body: `cpus` and/or `memory_mib` (whole numbers); the owner's or an admin's."""
        body = req.json()
        cpus, memory_mib = _opt_int(body, "cpus"), _opt_int(body, "memory_mib")
        if cpus is None and memory_mib is None:
            raise ApiError(400, "give cpus and/or memory_mib", code="usage")
        with self.daemon.lock:
            record = self._own(req.caller, req.params["id"])
        lending.before_resize(self.daemon, record.id)
        return progress_stream(lambda _emit: [moves.resize(self.daemon, record.id, cpus,
                                                           memory_mib)])

    def drain(self, req: ApiRequest) -> Stream:
        self._admin(req, "draining a host")
        body = req.json()
        host = req.params["host"]
        self.daemon.config.host(host)
        unmovable = bool(_opt_bool(body, "checkpoint_unmovable"))
        policy = moves.policy_for(self.daemon)
        return progress_stream(lambda emit: moves.drain(
            self.daemon, host, unmovable, policy, note=lambda m: emit({"note": m})))

    def uncordon(self, req: ApiRequest) -> Json:
        self._admin(req, "uncordoning a host")
        host = req.params["host"]
        was = moves.uncordon(self.daemon, host)
        return Json({"host": host, "was_cordoned": was})

    def rebalance(self, req: ApiRequest) -> Stream | Json:
        self._admin(req, "rebalancing")
        body = req.json()
        max_moves = _opt_int(body, "max_moves")
        objective = _opt_str(body, "objective") or "whole-nodes"
        if objective not in ("whole-nodes", "fragments"):
            raise VmjobsError("objective must be whole-nodes or fragments")
        target = _opt_int(body, "target_cpus")
        if target == 0:
            raise VmjobsError("target_cpus must be a whole number >= 1")
        plan = moves.rebalance_plan(self.daemon, 4 if max_moves is None else max_moves,
                                    objective, 16 if target is None else target)
        shown = plan_view(plan)
        if _opt_bool(body, "dry_run"):
            return Json(shown)
        return progress_stream(lambda emit: (emit({"plan": shown}), moves.carry_out(
            self.daemon, plan, moves.policy_for(self.daemon),
            note=lambda m: emit({"note": m})))[1])

    def usage(self, req: ApiRequest) -> Json:
        """The load average per host or node, or per-user accounting (`vmjobs.usage.report`),
        over the last `since` seconds (default a day). Anyone may read host and node figures;
        per-user rows are the caller's own unless an admin asks (as `sreport` does)."""
        by = req.query.get("by") or "host"
        if by not in usage.GROUPINGS:
            raise ApiError(400, f"by={by!r}: use one of {', '.join(usage.GROUPINGS)}")
        since_s = req.number("since", 1, usage.MAX_SINCE_S) or usage.DEFAULT_SINCE_S
        now = time.time()
        daemon = self.daemon
        with daemon.lock:
            histories = daemon.store.usage_histories(now - since_s)
            cluster = daemon.live.cluster()
        capacity = usage.capacity_of(cluster.free(name) for name in cluster.hosts)
        return Json(usage.report(histories, capacity, now, now - since_s, by,
                                 None if req.caller.admin else req.caller.name,
                                 **usage_context(daemon.config, cluster)))

    def profiles(self, _req: ApiRequest) -> Json:
        """The config's hardware profiles, each with how many more jobs of it could start now
        on each host (`vmjobs.profiles.listing`)."""
        daemon = self.daemon
        with daemon.lock:
            cluster = daemon.live.cluster().copy()
        return Json(profile_listing(daemon.config, cluster))

    def pools(self, req: ApiRequest) -> Json:
        """Every pool (or the one named): members with free/total capacity, holders, and the
        pool's line of waiting jobs (`vmjobs.pools_view`). Anyone may read it, as `/v1/hosts`:
        it names holders' owners and ids, not their commands."""
        name = req.params.get("name")
        daemon = self.daemon
        with daemon.lock:
            ends = {a.job_id: a.ends_at for a in daemon.active.values()
                    if a.ends_at is not None}
            try:
                views = pools_view.from_store(daemon.store, daemon.config.pools,
                                              daemon.live.cluster(), daemon.waits, ends, name)
            except NotFound as exc:
                raise ApiError(404, str(exc)) from None
        return Json(views[0] if name is not None else views)

    # --- a gang's key-value store (the one its members' vmjob-ctl reads and writes) ---------

    def _gang(self, who: Caller, job_id: str) -> str:
        """The gang of `job_id` (a gang's id, a member's `GANG.i`, or a prefix), if the caller
        may act on it."""
        with self.daemon.lock:
            gang_id = self._gang_or_none(who, job_id)
            if gang_id is not None:
                return gang_id
            record = self.daemon.store.job(job_id) or self._by_prefix(who, job_id)
            if record is None:
                raise ApiError(404, f"no job {job_id}")
            if not may_act(who, record):
                raise ApiError(403, denial(who, record))
        ref = gang.gang_of(record.spec)
        if ref is None:
            raise ApiError(400, f"job {record.id} is not a gang: it has no key-value store")
        return ref.gang_id

    def _open_gang(self, who: Caller, job_id: str) -> str:
        """`_gang`, with its control state open: right after a daemon restart a request can
        come before the recovery re-attached the members (the state is then read from the
        store here)."""
        gang_id = self._gang(who, job_id)
        if gang_id not in self.daemon.control.gang_ids():
            gangwire.open_control(self.daemon, gang_id)
        return gang_id

    def kv_get(self, req: ApiRequest) -> Json:
        gang_id = self._open_gang(req.caller, req.params["id"])
        key = req.query.get("key", "")
        try:
            value = self.daemon.control.kv_get(gang_id, key)
        except ControlError as exc:
            raise ApiError(409, str(exc)) from None
        if value is None:
            raise ApiError(404, f"gang {gang_id} has no key {key!r}")
        return Json({"gang": gang_id, "key": key, "value": value})

    def kv_set(self, req: ApiRequest) -> Json:
        body = req.json()
        gang_id = self._open_gang(req.caller, req.params["id"])
        key, value = body.get("key"), body.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ApiError(400, "key and value must be strings")
        try:
            self.daemon.control.kv_set(gang_id, key, value)
        except ControlError as exc:
            raise ApiError(409 if "not a running gang" in str(exc) else 400, str(exc)) from None
        return Json({"gang": gang_id, "key": key, "value": value})

    def upload(self, req: ApiRequest) -> Json:
        token = self.uploads.receive(req.caller.uid, req.body, req.length)
        return Json({"upload": token}, status=201)


def progress_stream(work: Callable[[Callable[[dict[str, Any]], None]], list[MoveResult]]
                    ) -> Stream:
    """Run `work` on its own thread; stream what it reports, then its results (or its error)
    as the last line. The work goes on to its end even if the client goes away: a migration
    half-done must finish or be rolled back, never abandoned."""
    lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()

    def run() -> None:
        try:
            results = work(lines.put)
            lines.put({"results": [r.to_dict() for r in results]})
        except VmjobsError as exc:
            lines.put({"error": str(exc)})
        except Exception as exc:  # a bug: still one line for the client, the trace in the log
            logging.getLogger("vmjobs.daemon").exception("move failed")
            lines.put({"error": f"internal error: {exc}"})
        finally:
            lines.put(None)

    threading.Thread(target=run, name="move", daemon=True).start()

    def chunks() -> Iterator[bytes]:
        while (line := lines.get()) is not None:
            yield (json.dumps(line) + "\n").encode()

    return Stream(chunks(), content_type="application/x-ndjson")


def migration_progress(progress: Any) -> dict[str, Any]:
    return {"elapsed_s": round(progress.elapsed_s, 2), "memory_total": progress.memory_total,
            "memory_remaining": progress.memory_remaining, "rate_bps": progress.rate_bps,
            "downtime_ms": progress.downtime_ms, "phase": progress.phase}


def plan_view(plan: placement.Plan) -> dict[str, Any]:
    actions = []
    for action in plan.actions:
        if isinstance(action, placement.Migrate):
            actions.append({"action": "migrate", "job": action.job_id, "to": action.to_host,
                            "memory_mib": action.memory_mib})
        elif isinstance(action, placement.Repin):
            actions.append({"action": "repin", "job": action.job_id, "to": action.host,
                            "memory_mib": action.memory_mib})
        else:
            actions.append({"action": "checkpoint", "job": action.job_id,
                            "memory_mib": action.memory_mib})
    return {"found": plan.found, "summary": plan.summary, "cost_mib": plan.cost_mib,
            "actions": actions, "freed": [f"{h}/node{n}" for h, n in plan.freed]}


def _opt(body: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise VmjobsError(f"{key} must be {what}")
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    return _opt(body, key, (str,), "a string")


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = _opt(body, key, (int,), "a whole number >= 0")
    if value is not None and value < 0:
        raise VmjobsError(f"{key} must be a whole number >= 0")
    return value


def _opt_number(body: dict[str, Any], key: str) -> float | None:
    value = _opt(body, key, (int, float), "a number > 0")
    if value is not None and value <= 0:
        raise VmjobsError(f"{key} must be a number > 0")
    return value


def _opt_bool(body: dict[str, Any], key: str) -> bool | None:
    return _opt(body, key, (bool,), "true or false")


@dataclass(frozen=True)
class CancelQuery:
    """What `POST /v1/cancel` selects: named jobs or arrays, narrowed by the filters."""

    jobs: tuple[str, ...] = ()
    states: frozenset[JobState] = frozenset()
    user: str | None = None


def cancel_query(body: dict[str, Any]) -> CancelQuery:
    """The body of `POST /v1/cancel`; raises UsageError (400) on a bad field."""
    unknown = sorted(set(body) - {"jobs", "states", "user"})
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(unknown)} (allowed: jobs, states, user)")
    jobs = _str_list(body, "jobs")
    names = _str_list(body, "states")
    states = set()
    for name in names:
        try:
            state = JobState(name.upper())
        except ValueError:
            raise UsageError(f"unknown state {name!r} (states that can be cancelled: "
                             f"{', '.join(sorted(s.value for s in UNFINISHED))})") from None
        if state.finished:
            raise UsageError(f"state {state.value} is an end: jobs in it cannot be cancelled")
        states.add(state)
    user = _opt_str(body, "user")
    if not jobs and not states and user is None:
        raise UsageError("name the jobs or arrays to cancel, or give a filter (states, user)")
    return CancelQuery(tuple(jobs), frozenset(states), user)


def _str_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) \
            or len(value) > MAX_CANCEL_NAMES:
        raise UsageError(f"{key} must be a list of at most {MAX_CANCEL_NAMES} non-empty strings")
    return value


def _events(daemon: Daemon, job_id: str) -> list[dict[str, Any]]:
    return [{"time": e.time, "state": e.state.value, "host": e.host, "reason": e.reason,
             "note": e.note} for e in daemon.store.events(job_id)]


def _finished(daemon: Daemon, job_id: str) -> bool:
    record = daemon.store.job(job_id)
    return record is None or record.state.finished


def _spec(submission: Spec, image_id: str) -> dict[str, Any]:
    """What the store keeps: the spec in its canonical form, the image resolved to its id,
    `input` whether an upload came with it (its token is spent)."""
    spec = {**submission.to_dict(), "image": image_id, "input": submission.input is not None}
    if submission.wait_timeout is not None:
        spec["wait_deadline"] = time.time() + submission.wait_timeout
    return spec


class _Pipe(io.RawIOBase):
    """A write-only file whose writes become the chunks of a stream."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)


def _tar_stream(directory: Any) -> Iterator[bytes]:
    pipe = _Pipe()
    with tarfile.open(fileobj=pipe, mode="w|") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
            yield b"".join(pipe.chunks)
            pipe.chunks.clear()
    yield b"".join(pipe.chunks)
