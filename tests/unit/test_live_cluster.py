"""The daemon's live cluster model (vmjobs.daemon.live) against the store's truth.

A real SQLite store on disk, written through the Store's own methods by two connections (the
daemon's and another one, as a mover or a direct `vmjob run` in another process has); the
hosts are the engine's synthetic ones, whose state the test flips as `Hosts` would on a
connect or a close. After any sequence of events the model must equal one rebuilt from the
store.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import placement
from placement import HostState, Request
from placement.synthetic import make_host
from vmjobs.daemon.live import LiveCluster, LiveQueue, differences
from vmjobs.jobs import JobRecord, JobState
from vmjobs.runner import snapshot
from vmjobs.store import Store

HOSTS = ("h0", "h1", "h2")


class Inventory:
    """What `Hosts.inventory()` and `Hosts.generation` answer: hosts seen, up or down."""

    def __init__(self) -> None:
        self.hosts = {name: make_host(name, nodes=2, cores=4) for name in HOSTS[:2]}
        self.up = dict.fromkeys(self.hosts, True)
        self.generation = 0

    def __call__(self) -> list[placement.Host]:
        return [h if self.up[n] else replace(h, state=HostState.DOWN)
                for n, h in self.hosts.items()]

    def flip(self, name: str) -> None:
        self.up[name] = not self.up[name]
        self.generation += 1

    def add(self, name: str) -> None:
        self.hosts[name] = make_host(name, nodes=2, cores=4)
        self.up[name] = True
        self.generation += 1


def record(job_id: str, state: JobState = JobState.PLACED) -> JobRecord:
    return JobRecord(id=job_id, owner="alice", uid=1000, state=state, spec={"argv": ["true"]})


class World:
    """The store (two connections), the hosts, and the model under test."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.other = Store(path)  # another connection: a mover, a direct run elsewhere
        self.inventory = Inventory()
        self.live = LiveCluster(self.store, self.inventory, lambda: self.inventory.generation)
        self.queue = LiveQueue(self.store, lambda _record: None)
        self.count = 0

    def close(self) -> None:
        self.store.close()
        self.other.close()

    def truth(self) -> placement.Cluster:
        return snapshot(self.store, self.inventory())

    def place(self, store: Store, request: Request, state: JobState = JobState.PLACED,
              job_id: str | None = None) -> str | None:
        """Place a new job as a direct run does: decided inside the write lock."""
        self.count += 1
        job_id = job_id or f"j{self.count}"
        with store.reserving():
            decision = snapshot(store, self.inventory()).place(request)
            if decision.allocation is None:
                return None
            store.add_job(record(job_id, state), request, decision.allocation, "placed")
        return job_id

    def held(self) -> list[str]:
        return [h.job_id for h in self.store.held()]


def apply(world: World, event: str, n: int) -> None:
    store = world.other if n % 2 else world.store
    held = world.held()
    job = held[n % len(held)] if held else None
    host = HOSTS[n % len(HOSTS)]
    if event == "submit":
        world.count += 1
        store.submit(record(f"s{world.count}", JobState.QUEUED),
                     Request(cpus=1, memory_mib=256, priority=n % 3), "submitted")
    elif event == "cancel" and (queued := store.queued()):
        store.transition(queued[n % len(queued)][0].id, JobState.CANCELLED, "cancelled")
    elif event == "reserve":
        world.place(store, Request(cpus=1 + n % 3, memory_mib=512))
    elif event == "assign":  # a queued job placed by the scheduler
        world.count += 1
        job_id = f"q{world.count}"
        request = Request(cpus=1 + n % 2, memory_mib=256)
        store.submit(record(job_id, JobState.QUEUED), request, "submitted")
        with store.reserving():
            decision = snapshot(store, world.inventory()).place(request)
            if decision.allocation is not None:
                store.assign(job_id, decision.allocation, "placed")
    elif event == "release" and job is not None:
        store.transition(job, JobState.FAILED, "ended", release=True)
    elif event == "release-only" and job is not None:
        store.release(job)
    elif event == "delete" and job is not None:
        store.delete_job(job)
    elif event == "cordon" and host in world.inventory.hosts:
        store.cordon(host, "drain")
    elif event == "uncordon":
        store.uncordon(host)
    elif event == "host-flip" and host in world.inventory.hosts:
        world.inventory.flip(host)
    elif event == "host-new" and "h2" not in world.inventory.hosts:
        world.inventory.add("h2")
    elif event == "repin" and job is not None:
        current = store.holding(job)
        assert current is not None
        cluster = snapshot(store, world.inventory())
        cluster.release(job)
        cluster.set_state(current.allocation.host, HostState.UP)
        request = replace(current.request, host=current.allocation.host)
        decision = cluster.place(request, "spread")
        if decision.allocation is not None:
            store.repin_reservation(job, decision.allocation, "re-pinned")
    elif event == "migrate" and job is not None:
        # the destination is reserved first by a placeholder, which the job then takes over
        current = store.holding(job)
        assert current is not None
        placeholder = world.place(store, current.request, job_id=f"mig-{job}")
        if placeholder is not None:
            moved = store.holding(placeholder)
            assert moved is not None
            store.move_reservation(job, placeholder, moved.allocation)


EVENTS = ["submit", "cancel", "reserve", "assign", "release", "release-only", "delete",
          "cordon", "uncordon", "host-flip", "host-new", "repin", "migrate"]


def assert_queue(world: World) -> None:
    """The followed queue is the store's, in queue order: priority, then submission."""
    world.live.refresh()
    followed = [(r.id, q) for r, q in world.queue.follow(world.live)]
    truth = sorted(world.store.queued(), key=lambda e: (-e[1].priority, e[0].created, e[0].id))
    assert followed == [(r.id, q) for r, q in truth]


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    built = World(tmp_path / "state.db")
    yield built
    built.close()


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 11), st.booleans()),
                max_size=30))
def test_after_any_events_the_models_equal_the_store(
        tmp_path_factory: pytest.TempPathFactory,
        events: list[tuple[str, int, bool]]) -> None:
    world = World(tmp_path_factory.mktemp("live") / "state.db")
    try:
        world.live.refresh()
        for event, n, look in events:
            apply(world, event, n)
            if look:  # the scheduler looks after some events, not after each
                world.live.refresh()
                assert world.live.check() == []
                assert_queue(world)
        assert differences(world.live.cluster(), world.truth()) == []
        assert_queue(world)
    finally:
        world.close()


def test_it_follows_by_change_not_by_rebuilding(world: World) -> None:
    world.live.refresh()
    assert world.live.rebuilds == 1
    jobs = [world.place(world.other, Request(cpus=2, memory_mib=512)) for _ in range(3)]
    world.store.transition(jobs[0] or "", JobState.FAILED, "ended", release=True)
    world.other.cordon("h1", "drain")
    world.inventory.flip("h0")
    cluster = world.live.cluster()
    assert world.live.rebuilds == 1  # followed, not rebuilt
    assert set(cluster.allocations()) == set(jobs[1:])
    assert cluster.hosts["h0"].state == HostState.DOWN
    assert cluster.hosts["h1"].state == HostState.CORDONED
    assert world.live.check() == []
    version = world.live.version
    assert world.live.refresh() is False and world.live.version == version  # nothing new


def test_a_new_host_rebuilds_it(world: World) -> None:
    world.live.refresh()
    world.inventory.add("h2")
    assert "h2" in world.live.cluster().hosts
    assert world.live.rebuilds == 2


def test_a_change_that_does_not_apply_rebuilds_from_the_store(world: World) -> None:
    job = world.place(world.store, Request(cpus=1, memory_mib=512))
    assert job is not None
    world.live.refresh()
    # the model wrongly believes the job holds nothing (as after a bug): when the store next
    # names the job, the release fails and the store's truth wins
    world.live._cluster.release(job)  # type: ignore[union-attr]
    world.store.transition(job, JobState.FAILED, "ended", release=True)
    world.place(world.store, Request(cpus=1, memory_mib=512))
    assert world.live.refresh() is True
    assert world.live.rebuilds == 2 and world.live.check() == []


def test_the_change_log_is_pruned_once_applied(world: World,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmjobs.daemon.live.PRUNE_EVERY", 2)
    world.live.refresh()
    for _ in range(3):
        world.place(world.store, Request(cpus=1, memory_mib=256))
    world.live.refresh()
    with world.store.reserving():
        world.live.prune()
    assert world.store.changes_since(0).jobs == set()
    assert world.live.check() == []
