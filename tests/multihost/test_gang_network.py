"""Gang networks and vmjob-ctl with real guests on the dev cluster.

The gangs here are groups of jobs started with the pieces `vmjob run` uses
(tests/multihost/jobs.py) plus the gang hooks the daemon's gang code calls
(`gangnet.create`, `gangmember.member_plan`, `ControlHub.open_gang/attach/member_failed`,
`gangnet.remove`/`sweep`): two members on h1 and h2, each guest on its host's gang bridge,
the hosts joined by VXLAN over the cluster's bridge.

Run under the guest lock:
    flock /tmp/vmjobs-guest.lock python3 -m pytest tests/multihost/test_gang_network.py
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.multihost.conftest import Cluster
from tests.multihost.jobs import connect, end_all, finish, output_text, start_job
from vmjobs import gangnet, migration
from vmjobs.config import Config
from vmjobs.control import MemberInfo
from vmjobs.controlhub import ControlHub
from vmjobs.gang import ENV_NODE, ENV_NODES
from vmjobs.gangmember import member_plan
from vmjobs.jobs import JobState, domain_name, new_job_id
from vmjobs.store import Store
from vmjobs.virt.conn import Reached, is_running, lookup_domain


@dataclass
class Gang:
    gang_id: str
    net: gangnet.GangNet
    members: list[str]  # job ids in index order


@dataclass
class Env:
    config: Config
    store: Store
    reached: Reached
    hub: ControlHub
    nets: dict[str, gangnet.HostNet]

    def start_gang(self, argvs: list[list[str]], hosts: list[str]) -> Gang:
        """What the daemon does when a gang starts: network, control state, members (with
        the env vmjobs.gang.gang_env gives them)."""
        gang_id = new_job_id()
        net = gangnet.create(self.config.spool, self.nets, gang_id, list(enumerate(hosts)))
        self.hub.open_gang(gang_id, {i: MemberInfo(h, net.address(i))
                                     for i, h in enumerate(hosts)})
        members = []
        for index, (argv, host) in enumerate(zip(argvs, hosts, strict=True)):
            job_id = f"{gang_id}.{index}"
            start_job(self.config, self.store, self.reached, argv, host, job_id=job_id,
                      plan_hook=lambda plan, i=index: member_plan(
                          replace(plan, vmjob_env={**plan.vmjob_env, ENV_NODE: str(i),
                                                   ENV_NODES: str(len(hosts))}),
                          net, i, self.config.spool))
            self.hub.attach(gang_id, index, self.reached.conns[host], domain_name(job_id))
            members.append(job_id)
        return Gang(gang_id, net, members)

    def end_gang(self, gang: Gang) -> None:
        self.hub.close_gang(gang.gang_id)
        gangnet.remove(self.config.spool, self.nets, gang.gang_id)

    def stopped(self, job_id: str) -> bool:
        record = self.store.job(job_id)
        assert record is not None and record.host is not None
        dom = lookup_domain(self.reached.conns[record.host], domain_name(job_id))
        return dom is None or not is_running(dom)


@pytest.fixture()
def env(cluster: Cluster, store: Store) -> Iterator[Env]:
    config = cluster.config
    reached = connect(config)
    hub = ControlHub()
    nets = gangnet.host_nets(config)
    yield Env(config, store, reached, hub, nets)
    hub.shutdown()
    end_all(store, reached)
    gangnet.sweep(config.spool, nets, live=[])
    for conn in reached.conns.values():
        conn.close()


def gang_devices(cluster: Cluster, host: str) -> list[str]:
    links = subprocess.run(["ip", "-n", cluster.layout.netns(host), "-o", "link"],
                           capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
            if ": vjg" in line]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               step: float = 0.05) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(step)
    return time.monotonic()


# node0 publishes a value and both meet at a barrier, then ping each other by name
NODE0 = ["sh", "-c", 'vmjob-ctl kv set greeting "hello from $VMJOB_NODE of $VMJOB_NODES" && '
                     "vmjob-ctl barrier ready --timeout 120 && echo passed-barrier && "
                     "ping -c 2 -W 5 node1 && echo peers=$VMJOB_PEERS"]
NODE1 = ["sh", "-c", 'v=$(vmjob-ctl kv get greeting --wait) && echo "got=$v" && '
                     "vmjob-ctl barrier ready --timeout 120 && echo passed-barrier && "
                     "ping -c 2 -W 5 node0 && vmjob-ctl nodes"]


def test_two_members_ping_by_name_pass_kv_and_meet_at_a_barrier(cluster: Cluster,
                                                                env: Env) -> None:
    gang = env.start_gang([NODE0, NODE1], ["h1", "h2"])
    assert gang_devices(cluster, "h1") == [gang.net.bridge, gang.net.vxlan]
    assert gang_devices(cluster, "h2") == [gang.net.bridge, gang.net.vxlan]
    assert gang_devices(cluster, "h3") == []  # no member there
    records = [finish(env.config, env.store, env.reached, job_id, timeout_s=240)
               for job_id in gang.members]
    out0, out1 = (output_text(env.config.spool, j) for j in gang.members)
    assert [r.state for r in records] == [JobState.COMPLETED, JobState.COMPLETED], (out0, out1)
    assert "got=hello from 0 of 2" in out1
    assert "passed-barrier" in out0 and "passed-barrier" in out1
    assert "2 packets received" in out0 and "2 packets received" in out1
    assert f"peers={gang.net.address(0)} {gang.net.address(1)}" in out0
    assert f"node0 h1 {gang.net.address(0)}" in out1 and f"node1 h2 {gang.net.address(1)}" in out1
    # the host reads the same store
    assert env.hub.kv_get(gang.gang_id, "greeting") == "hello from 0 of 2"
    env.end_gang(gang)
    assert gang_devices(cluster, "h1") == [] and gang_devices(cluster, "h2") == []
    assert gangnet.find(env.config.spool, gang.gang_id) is None


# a member of one gang takes an address in the other gang's subnet and tries to reach it
PROBE = ["sh", "-c", 'dev=$(ip -o -4 addr show | awk \'$2 != "lo" {print $2; exit}\') && '
                     'ping -c 2 -W 5 node0 >/dev/null && echo own-gang-ok; '
                     'ip addr add "$INTRUDER" dev "$dev" && '
                     'if ping -c 3 -W 2 "$TARGET"; then echo REACHED; else echo isolated; fi']
WAIT_DONE = ["sh", "-c", "vmjob-ctl barrier up --timeout 120 && vmjob-ctl kv get done --wait"]


def test_two_gangs_on_the_same_hosts_cannot_reach_each_other(cluster: Cluster,
                                                             env: Env) -> None:
    first = env.start_gang([WAIT_DONE, WAIT_DONE], ["h1", "h2"])
    target = first.net.address(1)
    intruder = f"{first.net.subnet.network_address + 200}/24"
    probe = [PROBE[0], PROBE[1], PROBE[2].replace("$INTRUDER", intruder)
             .replace("$TARGET", target)]
    second = env.start_gang([["sh", "-c", "sleep 30"], probe], ["h1", "h2"])
    assert first.net.vni != second.net.vni and first.net.subnet != second.net.subnet
    assert sorted(gang_devices(cluster, "h1")) == sorted(
        [first.net.bridge, first.net.vxlan, second.net.bridge, second.net.vxlan])
    probe_record = finish(env.config, env.store, env.reached, second.members[1], timeout_s=240)
    out = output_text(env.config.spool, second.members[1])
    assert probe_record.state == JobState.COMPLETED, out
    assert "own-gang-ok" in out  # the probe's own network works ...
    assert "isolated" in out and "REACHED" not in out, out  # ... the other gang's is not there
    # the first gang was up all along: its members pass their barrier and end on the host's word
    env.hub.kv_set(first.gang_id, "done", "yes")
    records = [finish(env.config, env.store, env.reached, j, timeout_s=120) for j in first.members]
    assert [r.exit_code for r in records] == [0, 0]
    env.end_gang(first)
    assert sorted(gang_devices(cluster, "h1")) == sorted([second.net.bridge, second.net.vxlan])
    env.end_gang(second)
    assert gang_devices(cluster, "h1") == [] and gang_devices(cluster, "h2") == []


WAITER = ["sh", "-c", "vmjob-ctl barrier b --timeout 300; echo rc=$?"]
FAILER = ["sh", "-c", "vmjob-ctl kv get go --wait; exit 1"]


def test_a_failed_member_poisons_the_barrier_within_2s(cluster: Cluster, env: Env) -> None:
    gang = env.start_gang([FAILER, WAITER], ["h1", "h2"])

    def waiting() -> bool:
        with env.hub.lock:
            barrier = env.hub.gangs[gang.gang_id].control.barriers.get("b")
            return barrier is not None and 1 in barrier.arrived

    wait_until(waiting, 180, "node1 waiting at the barrier")
    env.hub.kv_set(gang.gang_id, "go", "now")
    wait_until(lambda: env.stopped(gang.members[0]), 120, "node0 stopping", step=0.02)
    failed = finish(env.config, env.store, env.reached, gang.members[0])
    assert failed.exit_code == 1
    # the gang code's hook: a member ended with a non-zero status
    began = time.monotonic()
    env.hub.member_failed(gang.gang_id, 0, "exit status 1")
    heard = wait_until(lambda: "rc=1" in output_text(env.config.spool, gang.members[1]), 30,
                       "node1's barrier failing")
    out = output_text(env.config.spool, gang.members[1])
    assert "vmjob-ctl: poisoned by node0 (h1): exit status 1" in out
    print(f"poison: member_failed -> waiter's vmjob-ctl error in its output: "
          f"{heard - began:.3f}s")  # the figure docs/multinode.md quotes (pytest -s)
    assert heard - began < 2.0, f"{heard - began:.2f}s"
    finish(env.config, env.store, env.reached, gang.members[1])
    env.end_gang(gang)


def test_orphan_sweep_removes_networks_no_gang_owns(cluster: Cluster, env: Env,
                                                    tmp_path: Path) -> None:
    """After a crash: a registered network of a gang that ended, and devices whose record is
    gone, are both removed; a live gang's network, and another spool's, are kept."""
    spool = env.config.spool
    theirs = gangnet.create(tmp_path, env.nets, "theirgang", [(0, "h2")])
    dead = gangnet.create(spool, env.nets, "deadgang", [(0, "h1"), (1, "h2")])
    stray = gangnet.create(spool, env.nets, "straygang", [(0, "h2"), (1, "h3")])
    live = gangnet.create(spool, env.nets, "livegang", [(0, "h1"), (1, "h3")])
    (spool / "gangnet" / f"{stray.slot:04x}.json").unlink()  # its record lost
    done = gangnet.sweep(spool, env.nets, live=["livegang"])
    assert "gang deadgang: network removed" in done
    assert f"host h2: stray gang devices {stray.bridge} removed" in done
    assert sorted(gang_devices(cluster, "h1")) == sorted([live.bridge, live.vxlan])
    assert gang_devices(cluster, "h2") == [theirs.bridge]  # a bridge alone: one host
    assert sorted(gang_devices(cluster, "h3")) == sorted([live.bridge, live.vxlan])
    gangnet.remove(tmp_path, env.nets, "theirgang")
    assert [n.gang_id for n in gangnet.networks(spool)] == ["livegang"]
    assert dead.slot != live.slot
    gangnet.remove(spool, env.nets, "livegang")
    assert all(gang_devices(cluster, h) == [] for h in ("h1", "h2", "h3"))


MOVED0 = ["sh", "-c", "vmjob-ctl barrier moved --timeout 300 && ping -c 3 -W 5 node1 && "
                      "echo ping-after-move-ok"]
MOVED1 = ["sh", "-c", "v=$(vmjob-ctl kv get go --wait) && echo go=$v && "
                      "vmjob-ctl barrier moved --timeout 300 && ping -c 3 -W 5 node0 && "
                      "echo ping-after-move-ok"]


def test_a_migrated_member_keeps_its_network_and_control_port(cluster: Cluster,
                                                              env: Env) -> None:
    """node1 waits in `vmjob-ctl kv get --wait` while it is live-migrated h2 -> h3 the way the
    daemon moves a member (network made on h3 before the copy, settled after, port attached
    again on h3); the answer reaches it on h3, and the two members meet at a barrier and ping
    each other across h1 <-> h3. h2 has no gang device left."""
    gang = env.start_gang([MOVED0, MOVED1], ["h1", "h2"])

    def waiting() -> bool:
        with env.hub.lock:
            return bool(env.hub.gangs[gang.gang_id].control.kv_waits.get("go"))

    wait_until(waiting, 180, "node1 waiting for go")
    spool, member = env.config.spool, gang.members[1]
    moved = migration.migrate_job(
        env.config, env.store, env.reached.conns, env.reached.hosts, member, "h3",
        prepare_destination=lambda dest: gangnet.move(spool, env.nets, gang.gang_id, 1, dest,
                                                      keep=["h2"]))
    assert moved.destination == "h3"
    assert sorted(gang_devices(cluster, "h2")) == sorted([gang.net.bridge, gang.net.vxlan])
    gangnet.move(spool, env.nets, gang.gang_id, 1, "h3")
    assert gang_devices(cluster, "h2") == []
    env.hub.attach(gang.gang_id, 1, env.reached.conns["h3"], domain_name(member))
    env.hub.kv_set(gang.gang_id, "go", "after-the-move")
    records = [finish(env.config, env.store, env.reached, j, timeout_s=240)
               for j in gang.members]
    out0, out1 = (output_text(env.config.spool, j) for j in gang.members)
    assert [r.exit_code for r in records] == [0, 0], (out0, out1)
    assert "go=after-the-move" in out1
    assert "ping-after-move-ok" in out0 and "ping-after-move-ok" in out1
    env.end_gang(gang)
    assert all(gang_devices(cluster, h) == [] for h in ("h1", "h2", "h3"))
