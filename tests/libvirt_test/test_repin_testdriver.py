"""Re-pin control flow against libvirt's test driver: what happens when libvirt refuses, when
another job holds the cpus, and when the request cannot be a re-pin. (The test driver refuses
`pinVcpuFlags` with VIR_DOMAIN_AFFECT_LIVE, which is exactly the refusal path; the successful
re-pin of a real guest is tests/guest/test_repin.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from placement import Allocation, NodeShare, Repin, Request
from tests.libvirt_test.domain_specs import _spec
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.config import Config, parse
from vmjobs.daemon import moves
from vmjobs.daemon.api import plan_view
from vmjobs.daemon.core import Active, Daemon
from vmjobs.errors import VmjobsError
from vmjobs.jobs import JobRecord, JobState
from vmjobs.repin import RepinFailed, repin_job
from vmjobs.store import Store
from vmjobs.virt.domain_xml import build, read_metadata
from vmjobs.virt.events import start_event_loop

URI = "test:///default"


def on(cpu: int, node: int = 0) -> Allocation:
    return Allocation("a", (cpu,), 128, (NodeShare(node, (cpu,), 128),))


Setup = tuple[Store, libvirt.virConnect, libvirt.virDomain]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    conn = libvirt.open(URI)
    store = Store(tmp_path / "state.db")
    for job, cpu in (("j", 1), ("other", 3)):
        store.add_job(JobRecord(id=job, owner="root", uid=0, state=JobState.PLACED,
                                spec={"argv": ["true"]}), Request(1, 128), on(cpu), "test")
        for state in (JobState.STARTING, JobState.RUNNING):  # the state machine's way
            store.transition(job, state, "test")
    dom = conn.createXML(for_test_driver(build(_spec("j", "qemu", on(1)))), 0)
    yield store, conn, dom
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    store.close()
    conn.close()


def config(tmp_path: Path) -> Config:
    return parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                  "hosts": [{"name": "a", "uri": URI}]}, "test")


def held(store: Store, job: str) -> set[int]:
    return {c for c, owner in store.reserved_cpus("a").items() if owner == job}


def test_a_refused_repin_puts_the_reservation_back(setup: Setup, tmp_path: Path) -> None:
    store, conn, dom = setup
    with pytest.raises(RepinFailed, match=r"libvirt refused the re-pin to cpus 2, nodes 0: "
                                          r".*unsupported flags.*; nothing had changed"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", on(2))
    assert held(store, "j") == {1}
    assert [e.reason for e in store.events("j")][-2:] == [
        "re-pinned on a to cpus 2, nodes 0",
        "re-pin to cpus 2, nodes 0 failed: unsupported flags (0x1) in function "
        "testDomainPinVcpuFlags"]
    meta = read_metadata(dom.XMLDesc(0))
    assert meta is not None and meta.allocation.cpus == (1,)


def test_cpus_held_by_another_job_are_refused_before_libvirt(setup: Setup, tmp_path: Path) -> None:
    store, conn, _ = setup
    with pytest.raises(VmjobsError, match="job j: cpus 3, nodes 0 on a are held by another job"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", on(3))
    assert held(store, "j") == {1} and held(store, "other") == {3}


def test_what_a_repin_cannot_be(setup: Setup, tmp_path: Path) -> None:
    store, conn, _ = setup
    elsewhere = Allocation("b", (2,), 128, (NodeShare(0, (2,), 128),))
    with pytest.raises(VmjobsError, match="runs on a; a re-pin stays on its host"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", elsewhere)
    two = Allocation("a", (4, 5), 128, (NodeShare(0, (4, 5), 128),))
    with pytest.raises(VmjobsError, match="keeps the guest's 1 vCPUs and NUMA cells"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", two)
    assert held(store, "j") == {1}


# --- the daemon's side: a rebalance plan with a re-pin, and carrying it out ------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    start_event_loop()
    made = Daemon(parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                         "hosts": [{"name": "a", "uri": URI}]}, "test"))
    made.hosts.connect_all()
    assert made.hosts.is_up("a")
    yield made
    made.shutdown()


def test_the_daemon_plans_a_repin_and_a_refusal_leaves_the_job_running(daemon: Daemon) -> None:
    """test:///default has 2 cells of 8 cpus. j holds cpu 1 on node 0 (7 free: remainder 3 for
    S = 4), k cpus 8-9 on node 1 (6 free: remainder 2); moving j into node 1 completes a slot
    on node 0: a re-pin on host a, 1/13 instead of 5/13."""
    store = daemon.store
    for job, alloc in (("j", on(1)), ("k", Allocation("a", (8, 9), 128,
                                                      (NodeShare(1, (8, 9), 128),)))):
        store.add_job(JobRecord(id=job, owner="root", uid=0, state=JobState.PLACED,
                                spec={"argv": ["true"]}),
                      Request(len(alloc.cpus), 128), alloc, "test")
        for state in (JobState.STARTING, JobState.RUNNING):  # the state machine's way
            store.transition(job, state, "test")
    conn = libvirt.open(URI)
    dom = conn.createXML(for_test_driver(build(_spec("j", "qemu", on(1)))), 0)
    try:
        with daemon.lock:
            for job in ("j", "k"):
                daemon.active[job] = Active(job, "a", None, phase="running")
        plan = moves.rebalance_plan(daemon, 4, "fragments", 4)
        assert plan_view(plan)["actions"] == [
            {"action": "repin", "job": "j", "to": "a", "memory_mib": 128}]
        [step] = plan.actions
        assert isinstance(step, Repin) and step.allocation is not None
        assert [s.node for s in step.allocation.nodes] == [1]
        [result] = moves.carry_out(daemon, plan, moves.policy_for(daemon))
        assert result.action == "failed"
        assert "libvirt refused the re-pin to cpus 10, nodes 1" in result.detail
        assert held(store, "j") == {1}
        with daemon.lock:
            assert daemon.active["j"].phase == "running"
        record = store.job("j")
        assert record is not None and record.state == JobState.RUNNING
    finally:
        dom.destroy()
        conn.close()
