"""A gang's checkpoint and restore, all or none, against libvirt's test driver: a save that
fails leaves every member running (or says which one could not be put back), a gang that does
not fit is refused with nothing reserved, a restore that fails puts every member back to
CHECKPOINTED with its file. The test driver saves guests but refuses `restoreFlags` with
`VIR_DOMAIN_SAVE_PAUSED`, which is exactly a restore that fails; the whole round trip with
real guests is tests/multihost/test_gang_moves.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from placement import Allocation, NodeShare, Request
from placement.synthetic import make_host
from tests.libvirt_test.domain_specs import _spec
from tests.libvirt_test.test_domain_testdriver import for_test_driver
from vmjobs import checkpoint, gang
from vmjobs.config import Config, parse
from vmjobs.errors import DoesNotFit, VmjobsError
from vmjobs.guest import JobFiles
from vmjobs.jobs import JobRecord, JobState
from vmjobs.store import Store
from vmjobs.virt.domain_xml import build

URI = "test:///default"
GANG = "g"
IDS = [gang.member_id(GANG, i) for i in range(2)]


def on(host: str, cpu: int) -> Allocation:
    return Allocation(host, (cpu,), 128, (NodeShare(0, (cpu,), 128),))


@dataclass
class Setup:
    config: Config
    store: Store
    conn: libvirt.virConnect

    @property
    def conns(self) -> dict[str, libvirt.virConnect]:
        # both hosts are the one test driver: the functions only look guests up by name
        return {"a": self.conn, "b": self.conn}

    def state(self, job_id: str) -> int | None:
        try:
            return self.conn.lookupByName(f"vmjob-{job_id}").state()[0]
        except libvirt.libvirtError:
            return None

    def held(self) -> dict[str, dict[int, str]]:
        return {h: self.store.reserved_cpus(h) for h in ("a", "b")}

    def states(self) -> list[JobState]:
        return [r.state for r in gang.member_records(self.store, GANG)]

    def saves(self) -> list[bool]:
        return [checkpoint.save_path(self.config.spool, j).exists() for j in IDS]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A gang of two running members, g.0 on host a and g.1 on host b, kept apart."""
    # b's URI is never opened: the test driver behind a stands in for both (`conns`)
    config = parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                    "hosts": [{"name": "a", "uri": URI},
                              {"name": "b", "uri": "qemu+tcp://192.0.2.2/system"}]}, "test")
    conn = libvirt.open(URI)
    store = Store(tmp_path / "state.db")
    for index, (job_id, host) in enumerate(zip(IDS, ("a", "b"), strict=True)):
        spec = gang.member_spec({"argv": ["true"]}, GANG, index, 2, "stop")
        request = Request(1, 128, anti_affinity=f"gang:{GANG}/0")
        store.add_job(JobRecord(id=job_id, owner="root", uid=0, state=JobState.PLACED,
                                spec=spec), request, on(host, 1), "test")
        for state in (JobState.STARTING, JobState.RUNNING):  # the state machine's way
            store.transition(job_id, state, "test")
        JobFiles.of(config.spool, job_id).dir.mkdir(parents=True)
        conn.createXML(for_test_driver(build(_spec(job_id, "qemu", on(host, 1)))), 0)
    yield Setup(config, store, conn)
    for job_id in IDS:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(f"vmjob-{job_id}").destroy()
    store.close()
    conn.close()


def test_a_gang_is_saved_whole_and_frees_every_members_cores(setup: Setup) -> None:
    saved = checkpoint.checkpoint_gang(setup.config, setup.store, setup.conns, IDS)
    assert [(s.job_id, s.host) for s in saved] == [("g.0", "a"), ("g.1", "b")]
    assert setup.states() == [JobState.CHECKPOINTED, JobState.CHECKPOINTED]
    assert setup.held() == {"a": {}, "b": {}}
    assert setup.saves() == [True, True]
    assert [setup.state(j) for j in IDS] == [None, None]  # the guests left their hosts
    for job_id in IDS:  # every member was paused before any was saved
        reasons = [e.reason for e in setup.store.events(job_id)]
        assert any("every member of its gang paused" in (r or "") for r in reasons), reasons


def test_a_failed_first_save_leaves_every_member_running(setup: Setup) -> None:
    JobFiles.of(setup.config.spool, "g.0").dir.rmdir()  # nowhere to write g.0's save
    with pytest.raises(checkpoint.CheckpointFailed) as failed:
        checkpoint.checkpoint_gang(setup.config, setup.store, setup.conns, IDS)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("gang checkpoint failed: g.0 on a: ")
    assert message.endswith("; every member runs on")
    # both resumed (not left paused), both RUNNING, nothing released, no file
    assert [setup.state(j) for j in IDS] == [libvirt.VIR_DOMAIN_RUNNING] * 2
    assert setup.states() == [JobState.RUNNING, JobState.RUNNING]
    assert setup.held() == {"a": {1: "g.0"}, "b": {1: "g.1"}}
    assert setup.saves() == [False, False]


def test_a_failed_second_save_says_which_member_could_not_be_put_back(setup: Setup) -> None:
    # g.0 is saved, then g.1's save fails: g.0 is restored in place, paused — which the test
    # driver refuses, so g.0 stays CHECKPOINTED with its file, and the line says so
    JobFiles.of(setup.config.spool, "g.1").dir.rmdir()
    with pytest.raises(checkpoint.CheckpointFailed) as failed:
        checkpoint.checkpoint_gang(setup.config, setup.store, setup.conns, IDS)
    message = str(failed.value)
    assert "\n" not in message and message.startswith("gang checkpoint failed: g.1 on b: ")
    assert "g.0 stays CHECKPOINTED (unsupported flags" in message
    assert message.endswith("; the others run on")
    assert setup.states() == [JobState.CHECKPOINTED, JobState.RUNNING]
    assert setup.state("g.1") == libvirt.VIR_DOMAIN_RUNNING
    assert setup.held() == {"a": {}, "b": {1: "g.1"}}
    assert setup.saves() == [True, False]


def test_a_member_not_running_stops_the_gang_checkpoint_before_anything(setup: Setup) -> None:
    setup.conn.lookupByName("vmjob-g.1").destroy()
    with pytest.raises(VmjobsError, match=r"^job g.1's guest is not running on b; no member "
                                          r"was saved$"):
        checkpoint.checkpoint_gang(setup.config, setup.store, setup.conns, IDS)
    assert setup.state("g.0") == libvirt.VIR_DOMAIN_RUNNING  # never paused
    assert setup.states() == [JobState.RUNNING, JobState.RUNNING]


@pytest.fixture
def saved(setup: Setup) -> Setup:
    checkpoint.checkpoint_gang(setup.config, setup.store, setup.conns, IDS)
    return setup


def test_a_gang_that_does_not_fit_is_refused_and_nothing_is_held(saved: Setup) -> None:
    asked: list[dict[int, str]] = []
    # members apart, one host up: the gang cannot be restored; nothing is touched
    with pytest.raises(DoesNotFit) as refused:
        checkpoint.restore_gang(saved.config, saved.store, saved.conns, [make_host("a")], IDS,
                                prepare_hosts=asked.append)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("no room to restore the gang of 2: ")
    assert asked == []
    assert saved.states() == [JobState.CHECKPOINTED, JobState.CHECKPOINTED]
    assert saved.held() == {"a": {}, "b": {}}
    assert saved.saves() == [True, True]
    # both on one host, asked for explicitly: refused the same way
    with pytest.raises(DoesNotFit):
        checkpoint.restore_gang(saved.config, saved.store, saved.conns,
                                [make_host("a"), make_host("b")], IDS, to=["a", "a"])
    assert saved.held() == {"a": {}, "b": {}}
    with pytest.raises(VmjobsError, match="give one host per member, not 1"):
        checkpoint.restore_gang(saved.config, saved.store, saved.conns,
                                [make_host("a"), make_host("b")], IDS, to=["a"])


def test_a_restore_that_fails_puts_every_member_back(saved: Setup) -> None:
    asked: list[dict[int, str]] = []
    with pytest.raises(checkpoint.CheckpointFailed) as failed:
        checkpoint.restore_gang(saved.config, saved.store, saved.conns,
                                [make_host("a"), make_host("b")], IDS, to=["b", "a"],
                                prepare_hosts=asked.append)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("gang restore failed: g.0 on b: unsupported flags")
    assert message.endswith("; every member stays CHECKPOINTED")
    assert asked == [{0: "b", 1: "a"}]  # the network was asked for before any guest
    assert saved.states() == [JobState.CHECKPOINTED, JobState.CHECKPOINTED]
    assert saved.held() == {"a": {}, "b": {}}
    assert saved.saves() == [True, True]
    assert [saved.state(j) for j in IDS] == [None, None]
