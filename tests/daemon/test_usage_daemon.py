"""Usage through the daemon: `GET /v1/usage` (via `vmjob usage`), and the CPU sampler's
used-vs-held cores in `show --json` and the Prometheus metrics, on libvirt's test driver (a
job's domain "runs" there without a hypervisor), then with real guests (TCG) when the machine
allows."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.daemon.conftest import host_entry
from tests.daemon.test_remote import free_port, scrape


def _running(client: Any, job_id: str, daemon: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.job(job_id)["state"] != "RUNNING":
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)


def _sampled(client: Any, job_id: str, daemon: Any, timeout: float = 60) -> dict[str, Any]:
    """The job's view once the sampler has a rate for it (two samples, an interval apart)."""
    deadline = time.monotonic() + timeout
    while (view := client.job(job_id))["cpu_used_cores"] is None:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.2)
    return view


def test_usage_and_sampled_cpu_through_the_daemon(make_daemon: Any) -> None:
    port = free_port()
    daemon = make_daemon("usage", hosts=[{"name": "t", "uri": "test:///default"}],
                         metrics_port=port, usage_sample_interval=1, usage_window="5s")
    daemon.start()
    client = daemon.client()
    job_id = client.submit({"argv": ["true"], "cpus": 1})["id"]
    _running(client, job_id, daemon)
    view = _sampled(client, job_id, daemon)
    assert view["cpu_used_cores"] >= 0 and 0 < view["cpu_used_over_s"] <= 10
    metrics = scrape(port)
    assert metrics[f'vmjobs_job_cores_held{{host="t",job="{job_id}"}}'] == 1
    assert f'vmjobs_job_cores_used{{host="t",job="{job_id}"}}' in metrics
    assert metrics['vmjobs_host_cores_held{host="t"}'] == 1
    assert sum(v for k, v in metrics.items()
               if k.startswith('vmjobs_node_cores_held{host="t"')) == 1

    done = daemon.vmjob("usage", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [(r["host"], r["held_now"]) for r in rows] == [("t", 1)]
    users = json.loads(daemon.vmjob("usage", "--by", "user", "--json").stdout)["rows"]
    assert [(u["user"], u["jobs"], u["started"]) for u in users] == [("root", 1, 1)]
    bad = daemon.vmjob("usage", "--since", "5x")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1

    assert client.cancel(job_id)["state"] == "CANCELLED"
    after = scrape(port)
    assert not any(k.startswith("vmjobs_job_cores_held{") for k in after)
    rows = json.loads(daemon.vmjob("usage", "--json").stdout)["rows"]
    assert rows[0]["held_now"] == 0 and rows[0]["load"]["1m"] > 0  # it held for a while
    client.close()
    daemon.stop()


def test_busy_guest_uses_about_one_core_idle_about_none(make_daemon: Any) -> None:
    """Real guests (TCG): one burns its vCPU, one sleeps. Measured once both jobs have
    printed their first line (their guests have booted) and a whole window has passed.
    Tolerances are wide: TCG on a shared 2-core machine gives a busy vCPU whatever share of a
    core it can get; an idle one only its timer ticks."""
    daemon = make_daemon("usage-real", hosts=[host_entry()], usage_sample_interval=1,
                         usage_window="4s")
    daemon.start()
    client = daemon.client()
    busy = client.submit({"argv": ["sh", "-c", "echo go; while :; do :; done"], "cpus": 1,
                          "mem": "256M", "time_limit": "180s"})["id"]
    idle = client.submit({"argv": ["sh", "-c", "echo go; sleep 170"], "cpus": 1,
                          "mem": "256M", "time_limit": "180s"})["id"]
    try:
        for job_id in (busy, idle):
            deadline = time.monotonic() + 150
            while "go" not in "".join(client.logs(job_id)):
                assert time.monotonic() < deadline, daemon.log_text()
                time.sleep(0.5)
        time.sleep(6)  # a whole window (4 s) after both booted: only the jobs' own work
        used_busy = _sampled(client, busy, daemon)["cpu_used_cores"]
        used_idle = _sampled(client, idle, daemon)["cpu_used_cores"]
        print(f"cores used: busy {used_busy}, idle {used_idle}")  # the figure, with -s
        assert 0.2 <= used_busy <= 1.2, (used_busy, used_idle)
        assert used_idle <= 0.15, (used_busy, used_idle)
    finally:
        for job_id in (busy, idle):
            client.cancel(job_id)
        client.close()
        daemon.stop()


def test_users_see_their_own_usage_row_admins_all(make_daemon: Any) -> None:
    # loaded before the CLI runs in a child that became another user (it could not read our
    # Python's library under /root to import them then)
    import secrets  # noqa: F401

    import vmjobs.cli.jobs  # noqa: F401
    import vmjobs.cli.usage  # noqa: F401
    import vmjobs.spec  # noqa: F401
    from tests.daemon.users import as_user, make_users

    daemon = make_daemon("usage-users", hosts=[{"name": "t", "uri": "test:///default"}])
    daemon.start()
    client = daemon.client()
    with make_users(2) as (alice, bob):
        sub = as_user(alice, "--config", str(daemon.config), "submit", "--mem", "256M",
                      "--", "true")
        assert sub.code == 0, sub.err
        job_id = sub.out.strip()
        _running(client, job_id, daemon)

        def rows(user: Any, by: str) -> list[dict[str, Any]]:
            done = as_user(user, "--config", str(daemon.config), "usage", "--by", by,
                           "--json")
            assert done.code == 0, done.err
            return json.loads(done.out)["rows"]

        assert [r["user"] for r in rows(alice, "user")] == [alice.name]
        assert rows(bob, "user") == []  # bob ran nothing and sees no one else's row
        assert [r["held_now"] for r in rows(bob, "host")] == [1]  # aggregates: everyone
        admin = json.loads(daemon.vmjob("usage", "--by", "user", "--json").stdout)["rows"]
        assert [r["user"] for r in admin] == [alice.name]  # root sees alice's row
        client.cancel(job_id)
    client.close()
    daemon.stop()
