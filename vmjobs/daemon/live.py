"""The daemon's live cluster model: one `placement.Cluster` kept current change by change.

Before, every scheduling pass (and every submit) rebuilt the engine's view from the hosts'
inventory and every row the store holds: 1.36 s a pass at 1,000 hosts and 20,000 jobs. Now
the model is built that way once — at start, and whenever it cannot follow (a host's
hardware changed, a host was seen for the first time, a change did not apply) — and then
follows only what changed:

- holdings and cordons: the store's change log (`vmjobs.store.CHANGES`), a row per job whose
  allocation changed and per host cordoned or uncordoned, written by SQLite triggers. Every
  writer lands there — the daemon's scheduler, recovery and finishing paths, a mover's own
  store connection (migration placeholders, `move_reservation`, re-pins, preemption), a direct
  `vmjob run` in another process — and a transaction that rolls back leaves no row. Hooking
  the daemon's or the Store's methods instead would miss the other connections and
  processes, and would have to undo what a rolled-back transaction never did. A change names
  the job; the model reads that job's holding as the store has it now, so applying a change
  twice, or one already seen, is harmless;
- hosts up and down: `Hosts.generation`, bumped on every connect and close; only then are
  the hosts re-read.

Reading the log is a primary-key range scan, O(changes); a refresh with nothing new costs one
query. `check()` rebuilds from the store and lists every difference (the property test, and
recovery's own check).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import replace

import placement
from placement import Allocation, Cluster, HostState, Request
from vmjobs.daemon.queue import Waiting
from vmjobs.gang import gang_of
from vmjobs.jobarray import array_of
from vmjobs.jobs import JobRecord
from vmjobs.snapshot import snapshot
from vmjobs.store import Store

log = logging.getLogger("vmjobs.daemon")

# Applied changes kept in the log before the daemon deletes them (it is their only reader).
PRUNE_EVERY = 10_000


class LiveCluster:
    """The cluster as the engine sees it, current as of the last `refresh()`.

    State guarded: the cluster, what each job holds in it (with the request it was placed
    for), the hosts' inventory and cordons as last seen, and the last change applied. Not
    thread-safe by itself: it reads the store through the daemon's shared connection, so the
    caller holds the daemon's lock, as for every use of that connection.
    """

    def __init__(self, store: Store, inventory: Callable[[], list[placement.Host]],
                 generation: Callable[[], int]) -> None:
        self._store = store
        self._inventory = inventory
        self._generation = generation
        self._cluster: Cluster | None = None
        self._held: dict[str, tuple[Allocation, Request | None]] = {}
        self._hardware: dict[str, placement.Host] = {}  # as inventoried, state left out
        self._up: dict[str, bool] = {}
        self._cordoned: set[str] = set()
        self._seen_generation = -1
        self._seq = 0
        self._pruned = 0
        self._edits = 0  # changes applied since the last build
        self.rebuilds = 0  # how often it was built from scratch (tests, /v1/status)
        # jobs that entered or left the queue, read from the log for the `LiveQueue`; when
        # the model is rebuilt (the log skipped), the queue must be read again too
        self.queue_changes: set[str] = set()
        self.queue_stale = True

    # --- reading ------------------------------------------------------------------------------

    def cluster(self) -> Cluster:
        """The current model, refreshed. Shared: the caller must not change it (plan on a
        `copy()`, which is cheap)."""
        self.refresh()
        assert self._cluster is not None
        return self._cluster

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever the model does (as of the last refresh); not when only the queue
        does."""
        return (self.rebuilds, self._edits)

    # --- following --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Apply what changed since the last refresh; True if anything did. Reads one
        consistent view of the store (inside the caller's transaction, if any)."""
        with self._store.reading():
            generation = self._generation()
            if self._cluster is None:
                self._build(generation)
                return True
            changed = False
            if generation != self._seen_generation:
                if not self._follow_hosts():
                    self._build(generation)
                    return True
                self._seen_generation = generation
                changed = True
            found = self._store.changes_since(self._seq)
            self.queue_changes |= found.queue
            self._seq = found.last
            jobs, hosts = found.jobs, found.hosts
            if not jobs and not hosts:
                if changed:
                    self._edits += 1
                return changed
            try:
                for host in hosts:
                    if self._store.cordon_of(host) is None:
                        self._cordoned.discard(host)
                    else:
                        self._cordoned.add(host)
                    self._set_state(host)
                self._apply(jobs)
            except (placement.Conflict, placement.UnknownJob) as exc:
                # the log and the model disagree (a bug, or a store edited by hand): the store
                # is the truth
                log.warning("the live cluster model could not follow the store (%s); rebuilt",
                            exc)
                self._build(generation)
                return True
            self._edits += 1
            return True

    def rebuild(self) -> None:
        """Build the model afresh from the hosts and the store (at start, after recovery)."""
        with self._store.reading():
            self._build(self._generation())

    def prune(self) -> None:
        """Drop applied rows of the change log once there are many. Call inside the store's
        write transaction (`Store.reserving`)."""
        if self._seq - self._pruned >= PRUNE_EVERY:
            self._store.forget_changes(self._seq)
            self._pruned = self._seq

    def check(self) -> list[str]:
        """Every difference between the model and one rebuilt from the store now; [] when
        they agree. Refreshes first. O(cluster): for tests and recovery, not for a pass."""
        current = self.cluster()
        with self._store.reading():
            fresh = snapshot(self._store, self._inventory())
        return differences(current, fresh)

    # --- inside ---------------------------------------------------------------------------------

    def _build(self, generation: int) -> None:
        # the sequence number first: a change committed after it is applied again at the next
        # refresh, which is harmless (a change names a job; its holding is read as it is then)
        self._seq = self._store.last_change()
        hosts = self._inventory()
        cluster = snapshot(self._store, hosts)
        self._cluster = cluster
        self._held = {job: (alloc, cluster.request_of(job))
                      for job, alloc in cluster.allocations().items()}
        self._hardware = {h.name: replace(h, state=HostState.UP) for h in hosts}
        self._up = {h.name: h.state == HostState.UP for h in hosts}
        self._cordoned = set(self._store.cordoned())
        self._seen_generation = generation
        self._edits = 0
        self.rebuilds += 1
        self.queue_changes = set()
        self.queue_stale = True

    def _follow_hosts(self) -> bool:
        """Take hosts gone up or down; False when the model must be rebuilt instead (a host
        seen for the first time, or whose hardware changed)."""
        assert self._cluster is not None
        hosts = self._inventory()
        if [h.name for h in hosts] != list(self._cluster.hosts):
            return False
        for host in hosts:
            up = host.state == HostState.UP
            if replace(host, state=HostState.UP) != self._hardware[host.name]:
                return False
            if up != self._up[host.name]:
                self._up[host.name] = up
                self._set_state(host.name)
        return True

    def _set_state(self, host: str) -> None:
        """A host's state in the model: down without a connection; cordoned only when up (as
        `vmjobs.snapshot.snapshot` builds it)."""
        assert self._cluster is not None
        if host not in self._up:
            return  # never inventoried: not in the model
        if not self._up[host]:
            state = HostState.DOWN
        elif host in self._cordoned:
            state = HostState.CORDONED
        else:
            state = HostState.UP
        if self._cluster.hosts[host].state != state:
            self._cluster.set_state(host, state)

    def _apply(self, jobs: set[str]) -> None:
        """Bring the named jobs' holdings to what the store says now: every release first, so
        that a job taking cores another one freed in the same batch finds them free."""
        assert self._cluster is not None
        wanted: dict[str, tuple[Allocation, Request | None] | None] = {}
        for job in jobs:
            held = self._store.holding(job)
            if held is not None and held.allocation.host in self._up:
                wanted[job] = (held.allocation, held.request)
            else:
                wanted[job] = None  # holds nothing, or on a host never inventoried
        changed = {job: want for job, want in wanted.items() if self._held.get(job) != want}
        for job in changed:
            if job in self._held:
                self._cluster.release(job)
                del self._held[job]
        for job, want in changed.items():
            if want is not None:
                self._cluster.reserve(job, want[0], want[1])
                self._held[job] = want


def differences(model: Cluster, truth: Cluster) -> list[str]:
    """What differs between two clusters: hosts and their states, who holds what (with which
    request), and each host's free capacity. Empty when they are alike."""
    found = []
    if list(model.hosts) != list(truth.hosts):
        return [f"hosts: {list(model.hosts)} != {list(truth.hosts)}"]
    for name in model.hosts:
        if model.hosts[name] != truth.hosts[name]:
            found.append(f"host {name}: {model.hosts[name].state} != {truth.hosts[name].state}")
        if model.free(name) != truth.free(name):
            found.append(f"host {name}: free capacity differs")
    held, true_held = model.allocations(), truth.allocations()
    for job in sorted(set(held) | set(true_held)):
        if held.get(job) != true_held.get(job):
            found.append(f"job {job}: holds {held.get(job)} != {true_held.get(job)}")
        elif model.request_of(job) != truth.request_of(job):
            found.append(f"job {job}: request {model.request_of(job)} != "
                         f"{truth.request_of(job)}")
    return found



class LiveQueue:
    """The queued jobs in queue order (priority, then submission), followed through the same
    change log (`LiveCluster.queue_changes`): a pass reads O(jobs that entered or left the
    queue), not the whole queue with its JSON.

    State guarded: each queued job's record, request and `Waiting` (built once), and their
    order. The caller holds the daemon's lock.
    """

    def __init__(self, store: Store, time_limit: Callable[[JobRecord], float | None]) -> None:
        self._store = store
        self._time_limit = time_limit
        self._entries: dict[str, tuple[JobRecord, Request, Waiting]] = {}
        self._order: list[tuple[int, float, str]] = []  # (-priority, created, id), sorted

    def follow(self, live: LiveCluster) -> list[tuple[JobRecord, Request]]:
        """The queue now, in queue order, after taking what `live` read from the log."""
        if live.queue_stale:
            self._entries.clear()
            self._order.clear()
            for record, request in self._store.queued():
                self._add(record, request)
            live.queue_stale = False
            live.queue_changes.clear()
        else:
            for job_id in live.queue_changes:
                self._drop(job_id)
                found = self._store.queued_job(job_id)
                if found is not None:
                    self._add(*found)
            live.queue_changes.clear()
        return [self._entries[job_id][:2] for _, _, job_id in self._order]

    def waiting(self, record: JobRecord, request: Request) -> Waiting:
        """The job as the queue policy sees it (built once per queued job)."""
        entry = self._entries.get(record.id)
        if entry is not None:
            return entry[2]
        return self._make_waiting(record, request)

    def _make_waiting(self, record: JobRecord, request: Request) -> Waiting:
        array = array_of(record.spec)
        gang = gang_of(record.spec)
        return Waiting(record.id, request, self._time_limit(record),
                       array=array[0] if array else None,
                       array_limit=array[1] if array else None,
                       gang=gang.gang_id if gang else None,
                       borrower=bool(record.spec.get("borrow")))

    def _add(self, record: JobRecord, request: Request) -> None:
        key = (-request.priority, record.created, record.id)
        self._entries[record.id] = (record, request, self._make_waiting(record, request))
        bisect.insort(self._order, key)

    def _drop(self, job_id: str) -> None:
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            record, request, _ = entry
            key = (-request.priority, record.created, record.id)
            del self._order[bisect.bisect_left(self._order, key)]
