"""Held reservations without guests (libvirt's test driver): who may use and release one, and
a reservation tied to a client over `--url ssh://` released when that client is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon.conftest import Daemon
from tests.daemon.test_remote import SSHD, sshd  # noqa: F401 (a fixture)
from tests.daemon.test_reservations import read_line, until
from tests.daemon.users import as_user, make_users

KEY = "k-0f9e"


@pytest.fixture
def test_daemon(make_daemon: Any, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    daemon = make_daemon(f"holds-td-{request.node.name[:30]}",
                         hosts=[{"name": "t", "uri": "test:///default"}])
    daemon.start()
    yield daemon
    daemon.stop()


def test_only_the_owner_and_admins_use_a_reservation_and_only_admins_force_it(
        test_daemon: Daemon) -> None:
    url = f"unix://{test_daemon.socket}"
    with make_users(2) as (alice, bob):
        made = as_user(alice, "reserve", "--cpus", "1", "--key", KEY, "--duration", "10m",
                       "--url", url)
        assert made.code == 0, made.err
        rid = made.out.strip()
        # another user: refused as for another user's job, whatever the key
        bobs = as_user(bob, "submit", "--reservation", rid, "--key", KEY, "--url", url,
                       "--", "true")
        assert bobs.code == 1 and f"belongs to {alice.name}" in bobs.err, bobs.err
        assert as_user(bob, "release", rid, "--key", KEY, "--url", url).code == 1
        # the owner: not without the key, and not by force
        forced = as_user(alice, "release", rid, "--force", "--url", url)
        assert forced.code == 1 and "for administrators" in forced.err, forced.err
        keyless = as_user(alice, "release", rid, "--url", url)
        assert keyless.code == 77 and "needs its key" in keyless.err, keyless.err
        assert test_daemon.client().job(rid)["state"] == "HELD"
        # an admin (root): needs the key to run inside, but may force the release
        root_in = test_daemon.vmjob("submit", "--reservation", rid, "--", "true")
        assert root_in.returncode == 77, root_in.stderr
        forced = test_daemon.vmjob("release", "--force", rid)
        assert forced.returncode == 0, forced.stderr
        assert test_daemon.client().job(rid)["state"] == "RELEASED"
        assert test_daemon.reservations() == 0


def test_reserve_needs_the_daemon_and_refuses_what_only_jobs_have(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"spool: {tmp_path}\nsocket: {tmp_path / 'none.sock'}\nhosts:\n"
                      "  - {name: t, uri: 'test:///default'}\n")
    base = [sys.executable, "-m", "vmjobs", "--config", str(config)]
    no_daemon = subprocess.run([*base, "reserve", "--cpus", "1"], capture_output=True,
                               text=True, timeout=60)
    assert no_daemon.returncode == 1
    assert no_daemon.stderr.count("\n") == 1 and "needs the daemon (vmjob serve)" in \
        no_daemon.stderr, no_daemon.stderr
    for args in (["--env", "A=1"], ["--timeout", "1h"], ["--image", "x"]):
        refused = subprocess.run([*base, "reserve", *args], capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1
    inside = subprocess.run([*base, "run", "--reservation", "r1", "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert inside.returncode == 1 and "needs the daemon" in inside.stderr, inside.stderr


@pytest.mark.skipif(not os.path.exists(SSHD), reason="sshd is not installed")
def test_kill_9_of_a_client_over_ssh_releases_its_reservation(
        sshd: dict[str, Any], test_daemon: Daemon) -> None:  # noqa: F811 (the fixture)
    (sshd["home"] / ".ssh" / "known_hosts").write_text(sshd["host_line"])
    url = f"ssh://root@127.0.0.1:{sshd['port']}{test_daemon.socket}"
    env = {**os.environ, "HOME": str(sshd["home"])}
    env.pop("SSH_AUTH_SOCK", None)
    proc = subprocess.Popen([sys.executable, "-m", "vmjobs", "reserve", "--cpus", "1",
                             "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        rid = read_line(proc, 60)
        assert test_daemon.client().job(rid)["state"] == "HELD"
        assert test_daemon.reservations() == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        until(lambda: test_daemon.reservations() == 0, 60, "the reservation released")
        final = test_daemon.client().job(rid)
        assert final["state"] == "RELEASED"
        assert final["message"] == "its client's connection closed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_restart_releases_tied_reservations_and_keeps_those_with_a_duration(
        test_daemon: Daemon) -> None:
    kept = test_daemon.vmjob("reserve", "--cpus", "1", "--duration", "1h")
    assert kept.returncode == 0, kept.stderr
    kept_id = kept.stdout.strip()
    tied = subprocess.Popen([sys.executable, "-m", "vmjobs", "--config",
                             str(test_daemon.config), "reserve", "--cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tied_id = read_line(tied, 60)
        test_daemon.stop()
        assert tied.wait(timeout=60) == 1  # it says it lost the daemon
        test_daemon.start()
        until(lambda: test_daemon.client().job(tied_id)["state"] == "RELEASED", 60,
              "the tied reservation released at recovery")
        assert test_daemon.client().job(kept_id)["state"] == "HELD"
        # `vmjob pools` names it as a reservation among the holders, with its end
        pools = json.loads(test_daemon.vmjob("pools", "--json").stdout)
        holders = {h["id"]: h for pool in pools for h in pool["holders"]}
        assert holders[kept_id]["kind"] == "reservation"
        assert holders[kept_id]["until"] == test_daemon.client().job(kept_id)["until"]
        rows = test_daemon.query("SELECT DISTINCT job_id FROM cpu_reservations")
        assert [r["job_id"] for r in rows] == [kept_id]
    finally:
        if tied.poll() is None:
            tied.kill()
            tied.wait()
