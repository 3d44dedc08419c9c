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

from placement import Allocation, NodeShare, Request
from tests.libvirt_test.domain_specs import _spec
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs.config import parse
from vmjobs.domain_xml import build, read_metadata
from vmjobs.errors import VmjobsError
from vmjobs.jobs import JobRecord, JobState
from vmjobs.repin import RepinFailed, repin_job
from vmjobs.store import Store

URI = "test:///default"


def on(cpu: int, node: int = 0) -> Allocation:
    return Allocation("a", (cpu,), 128, (NodeShare(node, (cpu,), 128),))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Store, libvirt.virConnect, libvirt.virDomain]]:
    conn = libvirt.open(URI)
    store = Store(tmp_path / "state.db")
    for job, cpu in (("j", 1), ("other", 3)):
        store.add_job(JobRecord(id=job, owner="root", uid=0, state=JobState.RUNNING,
                                spec={"argv": ["true"]}), Request(1, 128), on(cpu), "test")
    dom = conn.createXML(for_test_driver(build(_spec("j", "qemu", on(1)))), 0)
    yield store, conn, dom
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    store.close()
    conn.close()


def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                  "hosts": [{"name": "a", "uri": URI}]}, "test")


def held(store: Store, job: str) -> set[int]:
    return {c for c, owner in store.reserved_cpus("a").items() if owner == job}


def test_a_refused_repin_puts_the_reservation_back(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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


def test_cpus_held_by_another_job_are_refused_before_libvirt(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, conn, _ = setup
    with pytest.raises(VmjobsError, match="job j: cpus 3, nodes 0 on a are held by another job"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", on(3))
    assert held(store, "j") == {1} and held(store, "other") == {3}


def test_what_a_repin_cannot_be(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, conn, _ = setup
    elsewhere = Allocation("b", (2,), 128, (NodeShare(0, (2,), 128),))
    with pytest.raises(VmjobsError, match="runs on a; a re-pin stays on its host"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", elsewhere)
    two = Allocation("a", (4, 5), 128, (NodeShare(0, (4, 5), 128),))
    with pytest.raises(VmjobsError, match="keeps the guest's 1 vCPUs and NUMA cells"):
        repin_job(config(tmp_path), store, {"a": conn}, "j", two)
    assert held(store, "j") == {1}
