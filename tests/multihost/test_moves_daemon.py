"""The daemon moving jobs on the 3-host dev cluster, through the CLI: migrate, drain, uncordon,
checkpoint/restore/cancel, and preemption with automatic restore. Real guests (TCG).

The daemon gets a spool of its own beside the cluster's (the image is shared through a
symlink), so the library-level tests' store never meets it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import SPOOL, Cluster

COUNTER = "i=0; while [ $i -lt {n} ]; do echo line $i; i=$((i+1)); usleep 250000; done; exit 3"


def _make_daemon(cluster: Cluster, name: str, **extra: Any) -> Daemon:
    spool = SPOOL / f"daemon-{name}"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(mode=0o755)
    for shared in ("images", "cache"):
        if (SPOOL / shared).exists():
            (spool / shared).symlink_to(SPOOL / shared)
    data = yaml.safe_load(cluster.config_path.read_text())
    data.update(spool=str(spool), socket=str(spool / "vmjobs.sock"), **extra)
    config = spool / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return Daemon(name, spool, config, spool / "vmjobs.sock", spool / "daemon.log")


@pytest.fixture()
def daemon(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    marker = request.node.get_closest_marker("daemon_config")
    made = _make_daemon(cluster, request.node.name[5:20].replace("_", ""),
                        **(marker.kwargs if marker else {}))
    made.start()
    try:
        yield made
    finally:
        ids = [r["id"] for r in made.query("SELECT id FROM jobs")]
        made.stop()
        left = _domains(cluster, ids)
        for host, name in left:  # never left behind for the next test
            conn = libvirt.open(cluster.layout.uri(int(host[1:])))
            try:
                conn.lookupByName(name).destroy()
            finally:
                conn.close()
        assert not left, f"domains left behind: {left}"


def _domains(cluster: Cluster, job_ids: list[str]) -> list[tuple[str, str]]:
    names = {f"vmjob-{j}" for j in job_ids}
    found = []
    for index in (1, 2, 3):
        conn = libvirt.open(cluster.layout.uri(index))
        try:
            found += [(f"h{index}", d.name()) for d in conn.listAllDomains() if d.name() in names]
        finally:
            conn.close()
    return found


def _submit(daemon: Daemon, *args: str) -> str:
    proc = daemon.vmjob("submit", "--mem", "128M", *args)
    assert proc.returncode == 0, proc.stderr + daemon.log_text()
    return proc.stdout.strip()


def _show(daemon: Daemon, job_id: str) -> dict[str, Any]:
    proc = daemon.vmjob("show", job_id, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _wait_state(daemon: Daemon, job_id: str, state: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = _show(daemon, job_id)
        if view["state"] == state:
            return view
        assert time.monotonic() < deadline, f"{job_id} is {view['state']}, not {state}:\n" \
            + daemon.log_text()
        time.sleep(0.2)


def _wait_output(daemon: Daemon, job_id: str, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in daemon.vmjob("logs", job_id).stdout:
        assert time.monotonic() < deadline, f"{job_id} never printed {needle!r}"
        time.sleep(0.3)


def _lines(daemon: Daemon, job_id: str) -> list[str]:
    out = daemon.vmjob("logs", job_id).stdout
    return [line for line in out.splitlines() if re.fullmatch(r"line \d+", line)]


def _assert_nothing_held(daemon: Daemon, timeout: float = 15) -> None:
    """An ended job's cores are freed when its QEMU is gone (the STOPPED event), about a
    second after its end is recorded."""
    deadline = time.monotonic() + timeout
    while daemon.reservations():
        assert time.monotonic() < deadline, daemon.query("SELECT * FROM cpu_reservations")
        time.sleep(0.2)


def test_migrate_then_drain_through_the_daemon(cluster: Cluster, daemon: Daemon) -> None:
    job = _submit(daemon, "--host", "h1", "--", "sh", "-c", COUNTER.format(n=60))
    _wait_output(daemon, job, "line 3")

    moved = daemon.vmjob("migrate", job, "--to", "h2", "--json", timeout=180)
    assert moved.returncode == 0, moved.stderr + daemon.log_text()
    (result,) = json.loads(moved.stdout)
    assert (result["action"], result["from"], result["to"]) == ("migrated", "h1", "h2")
    view = _show(daemon, job)
    assert view["state"] == "RUNNING" and view["host"] == "h2"
    assert view["allocation"]["host"] == "h2"
    assert ("MIGRATING", "h1") in [(e["state"], e["host"]) for e in view["events"]]
    assert any("downtime" in (e["reason"] or "") for e in view["events"])
    # the daemon's own record of who holds what: only h2 now
    held = {r["host"] for r in daemon.query("SELECT host FROM cpu_reservations")}
    assert held == {"h2"}

    drained = daemon.vmjob("drain", "h2", "--json", timeout=180)
    assert drained.returncode == 0, drained.stderr + daemon.log_text()
    (result,) = json.loads(drained.stdout)
    assert result["action"] == "migrated" and result["to"] in ("h1", "h3")
    assert _show(daemon, job)["host"] == result["to"]
    assert not [h for h, _ in _domains(cluster, [job]) if h == "h2"]
    shown = daemon.vmjob("hosts", "h2", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["state"] == "cordoned"
    # a cordoned host takes nothing new: a job that needs h2 waits, and says why
    pinned = _submit(daemon, "--host", "h2", "--", "true")
    view = _show(daemon, pinned)
    assert view["state"] == "QUEUED" and "cordoned" in (view["waiting_because"] or ""), view
    uncordoned = daemon.vmjob("uncordon", "h2")
    assert uncordoned.returncode == 0 and uncordoned.stdout.strip() == "h2: uncordoned"
    assert daemon.vmjob("wait", pinned).returncode == 0

    waited = daemon.vmjob("wait", job, timeout=180)
    assert waited.returncode == 3, waited.stderr + daemon.log_text()
    assert _lines(daemon, job) == [f"line {i}" for i in range(60)]
    _assert_nothing_held(daemon)


def test_bad_moves_are_one_line_and_change_nothing(cluster: Cluster, daemon: Daemon) -> None:
    job = _submit(daemon, "--", "sleep", "60")
    _wait_state(daemon, job, "RUNNING")
    before = daemon.query("SELECT host, cpu, job_id FROM cpu_reservations ORDER BY host, cpu")
    host = _show(daemon, job)["host"]
    for args, message in [
        (("migrate", job, "--to", "nowhere"), "unknown host 'nowhere'"),
        (("migrate", job, "--to", host), f"already runs on {host}"),
        (("migrate", "00000000"), "no job 00000000"),
        (("restore", job), "not CHECKPOINTED"),
        (("drain", "nowhere"), "unknown host 'nowhere'"),
        (("migrate", job, "--max-downtime", "0"), "Invalid value"),
    ]:
        proc = daemon.vmjob(*args)
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    after = daemon.query("SELECT host, cpu, job_id FROM cpu_reservations ORDER BY host, cpu")
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert _show(daemon, job)["state"] == "RUNNING"

    # checkpoint, then cancel: its checkpoint is removed and it holds nothing
    saved = daemon.vmjob("checkpoint", job, "--json", timeout=120)
    assert saved.returncode == 0, saved.stderr + daemon.log_text()
    assert _show(daemon, job)["state"] == "CHECKPOINTED"
    assert daemon.reservations() == 0
    checkpoint = daemon.spool / "jobs" / job / "checkpoint.save"
    assert checkpoint.exists()
    assert daemon.vmjob("cancel", job).returncode == 0
    assert _show(daemon, job)["state"] == "CANCELLED"
    assert not checkpoint.exists()


@pytest.mark.daemon_config(preemption=True)
def test_preemption_checkpoints_then_restores_the_preemptible_job(cluster: Cluster,
                                                                   daemon: Daemon) -> None:
    # every host full: a preemptible job on h1, guaranteed ones on h2 and h3
    preemptible = _submit(daemon, "--cpus", "2", "--host", "h1", "--preemptible", "--",
                          "sh", "-c", COUNTER.format(n=40).replace("exit 3", "exit 0"))
    blockers = [_submit(daemon, "--cpus", "2", "--host", h, "--", "sleep", "25")
                for h in ("h2", "h3")]
    _wait_output(daemon, preemptible, "line 3")
    for blocker in blockers:
        _wait_state(daemon, blocker, "RUNNING")

    guaranteed = _submit(daemon, "--cpus", "2", "--", "sh", "-c", "echo guaranteed ran")
    waited = daemon.vmjob("wait", guaranteed, timeout=180)
    assert waited.returncode == 0, waited.stderr + daemon.log_text()
    assert "guaranteed ran" in daemon.vmjob("logs", guaranteed).stdout

    # the preempted job was checkpointed for it, and came back by itself when room appeared
    done = daemon.vmjob("wait", preemptible, timeout=240)
    assert done.returncode == 0, done.stderr + daemon.log_text()
    view = _show(daemon, preemptible)
    states = [e["state"] for e in view["events"]]
    assert "CHECKPOINTED" in states and "RESTORING" in states, states
    assert any(f"preempted for job {guaranteed}" in (e["reason"] or "")
               for e in view["events"]), view["events"]
    assert _lines(daemon, preemptible) == [f"line {i}" for i in range(40)]
    g_view = _show(daemon, guaranteed)
    g_start = next(e["time"] for e in g_view["events"] if e["state"] == "RUNNING")
    p_saved = next(e["time"] for e in view["events"] if e["state"] == "CHECKPOINTED")
    assert p_saved <= g_start
    for blocker in blockers:
        assert daemon.vmjob("wait", blocker).returncode == 0
    _assert_nothing_held(daemon)
    assert not Path(daemon.spool / "jobs" / preemptible / "checkpoint.save").exists()


def test_rebalance_frees_a_node(cluster: Cluster, daemon: Daemon) -> None:
    # packed onto one host, then one moved away by hand: two half-used nodes. (Jobs that
    # asked for a host with --host are never moved by rebalance.)
    jobs = [_submit(daemon, "--", "sh", "-c", COUNTER.format(n=60)) for _ in range(2)]
    for job in jobs:
        _wait_output(daemon, job, "line 2")
    first = _show(daemon, jobs[0])["host"]
    assert _show(daemon, jobs[1])["host"] == first
    other = next(h for h in ("h1", "h2", "h3") if h != first)
    assert daemon.vmjob("migrate", jobs[1], "--to", other, timeout=180).returncode == 0
    dry = daemon.vmjob("rebalance", "--dry-run", "--max-moves", "1", "--json")
    assert dry.returncode == 0, dry.stderr
    dry_answer = json.loads(dry.stdout)
    assert dry_answer["results"] == []  # one shape with or without --dry-run
    plan = dry_answer["plan"]
    assert plan["found"] and len(plan["actions"]) == 1, plan
    (action,) = plan["actions"]
    assert action["action"] == "migrate" and action["job"] in jobs
    assert [_show(daemon, j)["host"] for j in jobs] == [first, other]  # a dry run moves nothing

    done = daemon.vmjob("rebalance", "--max-moves", "1", "--json", timeout=180)
    assert done.returncode == 0, done.stderr + daemon.log_text()
    answer = json.loads(done.stdout)
    assert answer["plan"]["actions"] == plan["actions"]
    (result,) = answer["results"]
    assert (result["job"], result["action"], result["to"]) == \
        (action["job"], "migrated", action["to"])
    hosts = [_show(daemon, j)["host"] for j in jobs]
    assert hosts[0] == hosts[1], hosts  # both on one host: the other one's node is free
    for job in jobs:
        assert daemon.vmjob("wait", job, timeout=180).returncode == 3
        assert _lines(daemon, job) == [f"line {i}" for i in range(60)]
    _assert_nothing_held(daemon)


def test_drain_checkpoints_what_cannot_move_and_restores_it_elsewhere(
        cluster: Cluster, daemon: Daemon) -> None:
    stuck = _submit(daemon, "--cpus", "2", "--host", "h1", "--", "sh", "-c",
                    COUNTER.format(n=40).replace("exit 3", "exit 0"))
    blockers = [_submit(daemon, "--cpus", "2", "--host", h, "--", "sleep", "20")
                for h in ("h2", "h3")]
    _wait_output(daemon, stuck, "line 3")
    for blocker in blockers:
        _wait_state(daemon, blocker, "RUNNING")
    refused = daemon.vmjob("drain", "h1")  # nowhere to go, and no checkpoint allowed
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("vmjob: 1 of 1 job(s) did not move")
    assert _show(daemon, stuck)["state"] == "RUNNING"

    drained = daemon.vmjob("drain", "h1", "--checkpoint-unmovable", "--json", timeout=180)
    assert drained.returncode == 0, drained.stderr + daemon.log_text()
    (result,) = json.loads(drained.stdout)
    assert result["action"] == "checkpointed"
    done = daemon.vmjob("wait", stuck, timeout=240)
    assert done.returncode == 0, done.stderr + daemon.log_text()
    view = _show(daemon, stuck)
    assert view["host"] in ("h2", "h3")  # h1 stays cordoned
    assert _lines(daemon, stuck) == [f"line {i}" for i in range(40)]
    assert daemon.vmjob("uncordon", "h1").returncode == 0
    for blocker in blockers:
        assert daemon.vmjob("wait", blocker).returncode == 0
    _assert_nothing_held(daemon)


def _slow_migration(daemon: Daemon, job: str) -> Any:
    """Start migrating `job` at 1 MiB/s (its ~90 MiB would take about 90 s; the completion
    timeout is lifted so that only a stop can cut it short) and return once the job is
    MIGRATING, with the `vmjob migrate` process."""
    mover = daemon.popen("migrate", job, "--bandwidth", "1", "--timeout", "10m", "--json")
    try:
        _wait_state(daemon, job, "MIGRATING", timeout=60)
    except BaseException:
        mover.kill()
        raise
    return mover


def _event_times(view: dict[str, Any], state: str) -> list[float]:
    return [e["time"] for e in view["events"] if e["state"] == state]


def test_cancel_during_a_migration_aborts_it_and_ends_the_job(cluster: Cluster,
                                                             daemon: Daemon) -> None:
    """A cancel during a slow migration aborts the copy (the guest stays on its source) and
    ends the job there within seconds, not when the copy would have finished."""
    job = _submit(daemon, "--", "sleep", "300")
    source = _wait_state(daemon, job, "RUNNING")["host"]
    mover = _slow_migration(daemon, job)
    try:
        asked = time.time()
        cancelled = daemon.vmjob("cancel", job, timeout=120)
        assert cancelled.returncode == 0, cancelled.stderr + daemon.log_text()
        view = _wait_state(daemon, job, "CANCELLED", timeout=60)
        out, err = mover.communicate(timeout=120)
    finally:
        if mover.poll() is None:
            mover.kill()
    ended = _event_times(view, "CANCELLED")[0]
    # the copy alone would take ~90 s; a bound far below it, and generous for a loaded machine
    assert ended - asked < 30, view["events"]
    assert mover.returncode != 0, out
    assert "cancel" in (out + err).lower(), out + err
    assert view["host"] == source, view  # it never left its source
    states = [e["state"] for e in view["events"]]
    assert states.index("MIGRATING") < states.index("CANCELLED"), states
    assert not _domains(cluster, [job])
    _assert_nothing_held(daemon)


def test_time_limit_during_a_migration_aborts_it_and_ends_the_job(cluster: Cluster,
                                                                  daemon: Daemon) -> None:
    """A time limit reached during a slow migration ends the job (TIMEOUT) soon after the
    limit, on its source; the migration is aborted rather than waited for."""
    job = _submit(daemon, "--time-limit", "20s", "--", "sleep", "300")
    source = _wait_state(daemon, job, "RUNNING")["host"]
    mover = _slow_migration(daemon, job)
    try:
        view = _wait_state(daemon, job, "TIMEOUT", timeout=120)
        out, err = mover.communicate(timeout=120)
    finally:
        if mover.poll() is None:
            mover.kill()
    started = _event_times(view, "RUNNING")[0]
    ended = _event_times(view, "TIMEOUT")[0]
    # limit 20 s; the copy alone takes ~90 s from the MIGRATING event on
    assert 19 < ended - started < 60, view["events"]
    assert mover.returncode != 0, out
    assert view["host"] == source, view
    assert not _domains(cluster, [job])
    _assert_nothing_held(daemon)
