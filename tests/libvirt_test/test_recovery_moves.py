"""Recovery settles moves that a daemon's end cut short, from the domains libvirt really runs
(libvirt's test driver stands in for a host: running domains carrying our <metadata>)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from placement import Allocation, NodeShare, Request
from tests.libvirt_test.domain_specs import SPECS
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.checkpoint import save_path
from vmjobs.config import parse
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.recovery import finish_interrupted_moves
from vmjobs.jobs import JobRecord, JobState
from vmjobs.virt.domain_xml import build
from vmjobs.virt.events import start_event_loop

URI = "test:///default"


def alloc(host: str, cpu: int) -> Allocation:
    return Allocation(host=host, cpus=(cpu,), memory_mib=128,
                      nodes=(NodeShare(node=0, cpus=(cpu,), memory_mib=128),))


def add(daemon: Daemon, job_id: str, state: JobState, where: Allocation,
        **spec: object) -> None:
    record = JobRecord(id=job_id, owner="root", uid=0, state=JobState.PLACED,
                       spec={"argv": ["true"], **spec})
    daemon.store.add_job(record, Request(cpus=1, memory_mib=128), where, "test")
    # seeded straight into `state`, as a daemon killed mid-move leaves it
    daemon.store.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state.value, job_id))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    start_event_loop()
    config = parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                    "nic_backend": "emulated", "hosts": [{"name": "a", "uri": URI}]}, "test")
    made = Daemon(config)
    made.hosts.connect_all()
    assert made.hosts.is_up("a")
    yield made
    made.shutdown()


@pytest.fixture
def guests() -> Iterator[list[str]]:
    """Job ids whose guests run on host a (test:///default)."""
    running: list[str] = []
    conn = libvirt.open(URI)
    yield running
    for job_id in running:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(f"vmjob-{job_id}").destroy()
    conn.close()


def run_guest(running: list[str], job_id: str) -> None:
    spec = replace(SPECS["1node-emulated-nic"](), name=f"vmjob-{job_id}", job_id=job_id)
    conn = libvirt.open(URI)
    try:
        conn.createXML(for_test_driver(build(spec)), 0)
    finally:
        conn.close()
    running.append(job_id)


def test_interrupted_moves_settle_where_the_guests_are(daemon: Daemon,
                                                       guests: list[str]) -> None:
    store = daemon.store
    # a migration that did not complete: the guest still runs on its source, a
    add(daemon, "stay", JobState.MIGRATING, alloc("a", 1))
    add(daemon, "mig-stay", JobState.PLACED, alloc("b", 1), placeholder_for="stay")
    run_guest(guests, "stay")
    # a migration that completed from z to a before the daemon could record it
    add(daemon, "went", JobState.MIGRATING, alloc("z", 1))
    add(daemon, "mig-went", JobState.PLACED, alloc("a", 2), placeholder_for="went")
    run_guest(guests, "went")
    # a restore whose guest never came up: back to its checkpoint
    add(daemon, "unrestored", JobState.RESTORING, alloc("a", 3))
    save_path(daemon.config.spool, "unrestored").parent.mkdir(parents=True)
    save_path(daemon.config.spool, "unrestored").write_bytes(b"saved")
    # a checkpoint that had not happened yet: the guest still runs
    add(daemon, "unsaved", JobState.CHECKPOINTING, alloc("a", 4))
    run_guest(guests, "unsaved")

    finish_interrupted_moves(daemon)

    states = {r.id: (r.state, r.host) for r in store.jobs()}
    assert states == {"stay": (JobState.RUNNING, "a"), "went": (JobState.RUNNING, "a"),
                      "unrestored": (JobState.CHECKPOINTED, "a"),
                      "unsaved": (JobState.RUNNING, "a")}
    assert store.reserved_cpus("a") == {1: "stay", 2: "went", 4: "unsaved"}
    assert store.reserved_cpus("b") == {} and store.reserved_cpus("z") == {}
    went = store.job("went")
    assert went is not None and went.allocation is not None and went.allocation["host"] == "a"
    assert save_path(daemon.config.spool, "unrestored").exists()  # kept for a later restore
