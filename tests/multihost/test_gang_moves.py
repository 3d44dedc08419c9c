"""A gang checkpointed and restored whole, one member checkpointed and restored elsewhere, and
a host running a member drained — through the daemon on the 3-host dev cluster, real guests
(TCG). After every move the gang's network and vmjob-ctl work where the members now run.

Run under the guest lock with a spool of your own:
    VMJOBS_MULTIHOST_SPOOL=/var/tmp/vmjobs-mh-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python3 -m pytest tests/multihost/test_gang_moves.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import Cluster
from tests.multihost.served import each_test, module_daemon
from tests.multihost.test_gang_ctl_daemon import _gang_devices, _until_no_network
from tests.multihost.test_gangs import _job_file, _lines, _wait
from tests.multihost.test_moves_daemon import _assert_nothing_held, _show, _submit, _wait_output
from vmjobs import gangnet

# one daemon on the cluster for the module, idle between tests (tests/multihost/served.py):
# every test makes its own gang, ends it and waits for its network to go
served = module_daemon("gangmoves")
daemon = each_test()

HOSTS = {"h1", "h2", "h3"}
LINES = 24
# each member counts (so it is moved mid-job), then waits for the host's word through kv (so
# it is still there for every move the test makes), meets the other at a barrier and pings it
# by name over the gang network
MEMBER = ("i=0; while [ $i -lt {n} ]; do echo line $i; i=$((i+1)); usleep 250000; done; "
          "vmjob-ctl kv get go --wait >/dev/null && vmjob-ctl barrier after --timeout 200 && "
          "ping -c 2 -W 5 node{peer} && echo pinged")


def _gang(daemon: Daemon, tmp_path: Path) -> str:
    return _submit(daemon, "-f", _job_file(tmp_path, {"mem": "128M", "nodes": [
        {"cmd": ["sh", "-c", MEMBER.format(n=LINES, peer=1)]},
        {"cmd": ["sh", "-c", MEMBER.format(n=LINES, peer=0)]},
    ]}))


def _timed(daemon: Daemon, *args: str) -> tuple[list[dict[str, object]], float]:
    started = time.monotonic()
    proc = daemon.vmjob(*args, "--json", timeout=240)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr + daemon.log_text()[-3000:]
    return json.loads(proc.stdout), took


def _states(daemon: Daemon, gang: str) -> list[str]:
    return [m["state"] for m in _show(daemon, gang)["members"]]


def _finish(cluster: Cluster, daemon: Daemon, gang: str) -> dict[str, object]:
    """Let the members go on (kv), then: the gang ends 0, each member printed every counter
    line exactly once, met the other at the barrier and pinged it; no network is left."""
    go = daemon.vmjob("kv", gang, "set", "go", "1")
    assert go.returncode == 0, go.stderr
    code, view = _wait(daemon, gang)
    outs = [daemon.vmjob("logs", f"{gang}.{i}").stdout for i in range(2)]
    assert code == 0, (view, outs, daemon.log_text()[-3000:])
    for index, out in enumerate(outs):
        assert _lines(daemon, f"{gang}.{index}") == [f"line {i}" for i in range(LINES)], out
        assert "2 packets received" in out and "pinged" in out, out
    _until_no_network(cluster, daemon)
    _assert_nothing_held(daemon)
    return view


def test_a_gang_checkpointed_and_restored_whole_and_one_member_alone(
        cluster: Cluster, daemon: Daemon, tmp_path: Path) -> None:
    gang = _gang(daemon, tmp_path)
    for index in range(2):
        _wait_output(daemon, f"{gang}.{index}", "line 3", timeout=180)
    first, second = _show(daemon, gang)["hosts"]
    free = (HOSTS - {first, second}).pop()
    slot = gangnet.find(daemon.spool, gang)
    assert slot is not None

    saved, took_save = _timed(daemon, "checkpoint", gang)
    assert [(r["job"], r["action"], r["from"]) for r in saved] == [
        (f"{gang}.0", "checkpointed", first), (f"{gang}.1", "checkpointed", second)]
    assert _states(daemon, gang) == ["CHECKPOINTED", "CHECKPOINTED"]
    _assert_nothing_held(daemon)
    for index in range(2):
        assert (daemon.spool / "jobs" / f"{gang}.{index}" / "checkpoint.save").exists()
        events = _show(daemon, f"{gang}.{index}")["events"]
        assert any("every member of its gang paused" in (e["reason"] or "") for e in events)
    # refusals: one line each, nothing changed
    bad = daemon.vmjob("restore", gang, "--to", free)
    assert bad.returncode == 2 and "one host per member" in bad.stderr, bad.stderr
    again = daemon.vmjob("checkpoint", gang)
    assert again.returncode == 1 and "only a gang whose members all run" in again.stderr
    for refused in (bad, again):
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert _states(daemon, gang) == ["CHECKPOINTED", "CHECKPOINTED"]

    # member 0 to the free host, member 1 to where member 0 was: the network follows both,
    # with the same addresses (the saved guests keep theirs)
    restored, took_restore = _timed(daemon, "restore", gang, "--to", f"{free},{first}")
    assert [(r["job"], r["action"], r["to"]) for r in restored] == [
        (f"{gang}.0", "restored", free), (f"{gang}.1", "restored", first)]
    assert _states(daemon, gang) == ["RUNNING", "RUNNING"]
    net = gangnet.find(daemon.spool, gang)
    assert net is not None and net.slot == slot.slot and net.hosts() == [free, first]
    devices = _gang_devices(cluster)
    assert devices and not [d for d in devices if d.startswith(f"{second}:")], devices
    for index in range(2):
        _wait_output(daemon, f"{gang}.{index}", f"line {LINES - 1}", timeout=180)

    # one member alone, restored on another host: its network is made there
    alone, _ = _timed(daemon, "checkpoint", f"{gang}.1")
    assert [r["action"] for r in alone] == ["checkpointed"]
    assert _states(daemon, gang) == ["RUNNING", "CHECKPOINTED"]
    back, took_one = _timed(daemon, "restore", f"{gang}.1", "--to", second)
    assert [(r["action"], r["to"]) for r in back] == [("restored", second)]
    assert _show(daemon, gang)["hosts"] == [free, second]
    assert not [d for d in _gang_devices(cluster) if d.startswith(f"{first}:")]

    view = _finish(cluster, daemon, gang)
    assert view["hosts"] == [free, second]
    print(f"\ngang of 2: checkpoint {took_save:.1f}s, restore {took_restore:.1f}s "
          f"(CLI round trips); one member's restore {took_one:.1f}s; saves: "
          f"{[r['detail'] for r in saved]}; restore: {restored[0]['detail']}")


def test_drain_moves_a_member_to_the_free_host_not_the_other_members(
        cluster: Cluster, daemon: Daemon, tmp_path: Path) -> None:
    gang = _gang(daemon, tmp_path)
    for index in range(2):
        _wait_output(daemon, f"{gang}.{index}", "line 3", timeout=180)
    first, second = _show(daemon, gang)["hosts"]
    free = (HOSTS - {first, second}).pop()
    try:
        drained, took = _timed(daemon, "drain", first)
        assert [(r["job"], r["action"], r["from"], r["to"]) for r in drained] == [
            (f"{gang}.0", "migrated", first, free)], drained
        assert _show(daemon, gang)["hosts"] == [free, second]
        assert not [d for d in _gang_devices(cluster) if d.startswith(f"{first}:")]
        _finish(cluster, daemon, gang)
    finally:
        daemon.vmjob("uncordon", first)
    print(f"\ndrain of a gang member's host: {took:.1f}s")
