"""The motivating CI case of issue 12, as docs/examples/migration-smoke.yaml gives it: node0
serves a counter on the gang's network, the host migrates node0 (twice, through the daemon),
node1 checks node0 over the network after each move. Run through `vmjob smoke migrate --gang`,
which reports per round what each member saw. The file is read from docs/, not copied.

Run under the guest lock with a spool of your own:
    VMJOBS_MULTIHOST_SPOOL=/var/tmp/vmjobs-mh-spool-NAME flock /tmp/vmjobs-guest.lock \\
        python3 -m pytest -s tests/multihost/test_gang_example.py
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import Cluster
from tests.multihost.served import each_test, module_daemon
from tests.multihost.test_gang_ctl_daemon import _until_no_network
from tests.multihost.test_moves_daemon import _assert_nothing_held, _show

# one daemon on the cluster for the module, idle between tests (tests/multihost/served.py)
served = module_daemon("gangexample")
daemon = each_test()

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "migration-smoke.yaml"


def test_the_docs_migration_example_checked_from_node1_per_round(
        cluster: Cluster, daemon: Daemon) -> None:
    began = time.monotonic()
    proc = daemon.vmjob("smoke", "migrate", "--gang", str(EXAMPLE), "--rounds", "2", "--json",
                        timeout=900)
    took = time.monotonic() - began
    assert proc.stdout, proc.stderr + daemon.log_text()[-3000:]
    report = json.loads(proc.stdout)
    gang = report["gang"]
    out0 = daemon.vmjob("logs", f"{gang}.0").stdout
    out1 = daemon.vmjob("logs", f"{gang}.1").stdout
    assert proc.returncode == 0 and report["passed"], (report, out0, out1)
    # what the report says, round by round
    first, second = report["rounds"]
    hosts = _show(daemon, gang)["hosts"]
    assert first["member"] == second["member"] == f"{gang}.0"
    assert first["source"] != first["destination"] and second["source"] == first["destination"]
    assert hosts[1] not in (first["destination"], second["destination"])  # kept apart
    assert hosts[0] == second["destination"]
    for r in (first, second):
        assert "downtime" in r["detail"], r
        a, b = (int(n) for n in r["checker_saw"].split())
        assert b > a, r
    # ...and what the members printed: node1's check passed after each move
    for number in (1, 2):
        assert re.search(rf"node1: round {number}: node0 answers, its counter went on: "
                         r"\d+ -> \d+", out1), out1
    assert "CHECK FAILED" not in out1
    # node0's workload went on across both moves: no tick lost, none repeated
    ticks = [int(n) for n in re.findall(r"^tick (\d+)$", out0, re.MULTILINE)]
    assert ticks == list(range(len(ticks))) and len(ticks) > 10, out0
    assert report["ticks"] == len(ticks)
    assert "node0: served 2 round(s)" in out0
    view = _show(daemon, gang)
    assert [m["exit_code"] for m in view["members"]] == [0, 0], view
    print("\n".join(line for line in proc.stderr.splitlines() if line.startswith("round ")))
    print(f"example: {took:.1f}s in all; rounds: "
          + "; ".join(f"{r['source']}->{r['destination']} {r['seconds']:.1f}s ({r['detail']})"
                      for r in report["rounds"]))  # the figures docs/multinode.md quotes
    _until_no_network(cluster, daemon)
    _assert_nothing_held(daemon)


def test_a_gang_with_no_wait_starts_whole_now_or_is_never_created(
        cluster: Cluster, daemon: Daemon) -> None:
    proc = daemon.vmjob("submit", "--nodes", "2", "--no-wait", "--mem", "128M", "--",
                        "vmjob-ctl", "kv", "get", "done", "--wait")
    assert proc.returncode == 0, proc.stderr + daemon.log_text()[-2000:]
    gang = proc.stdout.strip()
    # placed in the submit's own pass: no member waits in the queue
    assert all(m["state"] != "QUEUED" for m in _show(daemon, gang)["members"])
    # two hosts now hold a member each: a gang of three whole-host members cannot start now
    ids = {r["id"] for r in daemon.query("SELECT id FROM jobs")}
    dirs = {p.name for p in (daemon.spool / "jobs").iterdir()}
    refused = daemon.vmjob("submit", "--nodes", "3", "--cpus", "2", "--no-wait", "--mem",
                           "128M", "--", "true")
    assert refused.returncode == 75, refused.stdout + refused.stderr
    assert "cannot start now" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert {r["id"] for r in daemon.query("SELECT id FROM jobs")} == ids  # nothing stored
    assert {p.name for p in (daemon.spool / "jobs").iterdir()} == dirs  # no directory left
    _until_kv_set(daemon, gang)
    proc = daemon.vmjob("wait", gang, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _until_no_network(cluster, daemon)
    _assert_nothing_held(daemon)


def _until_kv_set(daemon: Daemon, gang: str, timeout_s: float = 180) -> None:
    """`vmjob kv GANG set done 1` once the gang's control state is open (its members run)."""
    deadline = time.monotonic() + timeout_s
    while daemon.vmjob("kv", gang, "set", "done", "1").returncode != 0:
        assert time.monotonic() < deadline, daemon.log_text()[-2000:]
        time.sleep(0.5)
