"""A running guest re-pinned to another cpu of its host, live: libvirt's view, the vCPU
thread's real affinity, the store's reservation and the domain's metadata all follow."""

from __future__ import annotations

import json
import os
import signal

import libvirt
import libvirt_qemu
import pytest

from placement import Allocation, NodeShare
from tests.guest.conftest import URI, Env, our_domains
from vmjobs.config import load
from vmjobs.errors import VmjobsError
from vmjobs.repin import repin_job
from vmjobs.store import Store
from vmjobs.virt.domain_xml import read_metadata
from vmjobs.virt.pinning import pinning_of

pytestmark = pytest.mark.guest


def vcpu_affinity(dom: libvirt.virDomain) -> set[int]:
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-cpus-fast"}',
                                                       0))
    [cpu] = reply["return"]
    return os.sched_getaffinity(cpu["thread-id"])


def test_a_running_guest_is_repinned_to_the_other_cpu(guest_env: Env) -> None:
    proc = guest_env.popen("run", "--cpus", "1", "--mem", "128M", "--",
                           "sh", "-c", "echo ready; sleep 120")
    store = Store(guest_env.spool / "state.db")
    conn = libvirt.open(URI)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        [dom] = [d for d in conn.listAllDomains() if d.name().startswith("vmjob-")]
        job_id = dom.name().removeprefix("vmjob-")
        record = store.job(job_id)
        assert record is not None and record.allocation is not None
        [was] = record.allocation["cpus"]
        other = 1 - was  # this machine: cpus 0 and 1, one NUMA node
        assert pinning_of(dom) == (frozenset({was}),)
        assert vcpu_affinity(dom) == {was}
        target = Allocation("local", (other,), 128, (NodeShare(0, (other,), 128),))

        done = repin_job(load(str(guest_env.config)), store, {"local": conn}, job_id, target)

        assert done.memory_moved_mib == 0, "same node: no memory changes node"
        assert pinning_of(dom) == (frozenset({other}),)
        assert vcpu_affinity(dom) == {other}, "the vCPU thread itself moved"
        assert dom.emulatorPinInfo()[other] and not dom.emulatorPinInfo()[was]
        held = {cpu for cpu, owner in store.reserved_cpus("local").items() if owner == job_id}
        assert held == {other}
        after = store.job(job_id)
        assert after is not None and after.allocation is not None
        assert after.allocation["cpus"] == [other]
        meta = read_metadata(dom.XMLDesc(0))
        assert meta is not None and meta.allocation == target
        assert [e for e in store.events(job_id) if "re-pinned on local" in (e.reason or "")]

        # Another vCPU count is refused before anything changes.
        with pytest.raises(VmjobsError, match="keeps the guest's 1 vCPUs"):
            repin_job(load(str(guest_env.config)), store, {"local": conn}, job_id,
                      Allocation("local", (0, 1), 128, (NodeShare(0, (0, 1), 128),)))
        assert pinning_of(dom) == (frozenset({other}),)
        assert dom.isActive()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        conn.close()
        store.close()
    assert not our_domains()
