"""`--url ssh://user@head`: the client reaches the daemon's socket through a real sshd.

A private sshd (own host key, own port on 127.0.0.1, public-key login only) is started for
the test, and the daemon watches libvirt's test driver (no guest is booted here). Skipped
when sshd is not installed (scripts/setup.sh does not install it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import Daemon

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not os.path.exists(SSHD), reason="sshd is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    keygen = ["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f"]
    subprocess.run([*keygen, str(tmp_path / "host_key")], check=True)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run([*keygen, str(home / ".ssh" / "id_ed25519")], check=True)
    (tmp_path / "authorized_keys").write_text((home / ".ssh" / "id_ed25519.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {tmp_path / 'host_key'}",
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no",
        "StrictModes no", "AllowStreamLocalForwarding yes", "PidFile none", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "sshd did not listen"
            time.sleep(0.05)
    host_key = (tmp_path / "host_key.pub").read_text().split()
    yield {"port": port, "home": home, "host_line": f"[127.0.0.1]:{port} {host_key[0]} "
                                                   f"{host_key[1]}\n"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def api_daemon(make_daemon: Any) -> Iterator[Daemon]:
    daemon = make_daemon("remote", hosts=[{"name": "t", "uri": "test:///default"}])
    daemon.start()
    yield daemon
    daemon.stop()


def client_run(home: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)


def test_unknown_host_key_is_refused(sshd: dict[str, Any], api_daemon: Daemon) -> None:
    url = f"ssh://root@127.0.0.1:{sshd['port']}{api_daemon.socket}"
    result = subprocess.run([sys.executable, "-m", "vmjobs", "list", "--url", url],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HOME": str(sshd["home"])})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vmjob: ssh to ssh://root@127.0.0.1:{sshd['port']}"), lines
    assert "not found in known_hosts" in lines[0]


def test_a_wrong_host_key_is_refused(sshd: dict[str, Any], api_daemon: Daemon,
                                     tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f",
                    str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    (sshd["home"] / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{sshd['port']} {other[0]} {other[1]}\n")
    url = f"ssh://root@127.0.0.1:{sshd['port']}{api_daemon.socket}"
    result = client_run(sshd["home"], f"""
from pathlib import Path
from vmjobs.client import Client
from vmjobs.errors import VmjobsError
try:
    Client.from_url({url!r}, Path('/nonexistent')).status()
except VmjobsError as exc:
    print(exc)
""")
    assert "ssh to" in result.stdout, (result.stdout, result.stderr)
    assert "status" not in result.stdout


def test_known_host_reaches_the_daemon_as_the_ssh_user(sshd: dict[str, Any],
                                                       api_daemon: Daemon) -> None:
    (sshd["home"] / ".ssh" / "known_hosts").write_text(sshd["host_line"])
    url = f"ssh://root@127.0.0.1:{sshd['port']}{api_daemon.socket}"
    result = client_run(sshd["home"], f"""
import json
from pathlib import Path
from vmjobs.client import Client
client = Client.from_url({url!r}, Path('/nonexistent'))
print(json.dumps([client.status()["you"], client.jobs(), client.status()["socket"]]))
client.close()
""")
    assert result.returncode == 0, result.stderr
    you, jobs, sock = json.loads(result.stdout)
    assert you == {"uid": 0, "name": "root", "admin": True}
    assert jobs == [] and sock == str(api_daemon.socket)
    listing = subprocess.run([sys.executable, "-m", "vmjobs", "list", "--all", "--url", url],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HOME": str(sshd["home"])})
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "no jobs"


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_on_a_tcp_port(make_daemon: Any) -> None:
    """Prometheus exposition while a job holds a cpu of libvirt's test driver, and after."""
    port = free_port()
    daemon = make_daemon("metrics", hosts=[{"name": "t", "uri": "test:///default"}],
                         metrics_port=port)
    daemon.start()
    client = daemon.client()
    before = scrape(port)
    assert before['vmjobs_host_up{host="t"}'] == 1
    assert before["vmjobs_queue_length"] == 0
    free = sum(v for k, v in before.items() if k.startswith('vmjobs_cpus_free{host="t"'))
    assert free > 0
    job_id = client.submit({"argv": ["true"], "cpus": 1})["id"]
    deadline = time.monotonic() + 30
    while client.job(job_id)["state"] != "RUNNING":
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    during = scrape(port)
    assert sum(v for k, v in during.items() if k.startswith('vmjobs_cpus_used{host="t"')) == 1
    assert sum(v for k, v in during.items() if k.startswith('vmjobs_cpus_free{host="t"')) \
        == free - 1
    assert during['vmjobs_jobs{state="RUNNING"}'] == 1
    assert during["vmjobs_queue_wait_seconds_count"] == 1
    assert client.cancel(job_id)["state"] == "CANCELLED"  # the test driver's STOPPED event
    after = scrape(port)
    assert after['vmjobs_jobs_ended_total{state="CANCELLED"}'] == 1
    assert after["vmjobs_stop_to_record_seconds_count"] == 1
    assert sum(v for k, v in after.items() if k.startswith('vmjobs_cpus_used{')) == 0
    assert daemon.reservations() == 0
    client.close()
    daemon.stop()


def test_one_daemon_per_spool(api_daemon: Daemon, tmp_path: Path) -> None:
    """A second daemon on the same spool, even on another socket, refuses to start with one
    line and leaves the first one serving."""
    import yaml

    assert api_daemon.proc is not None
    pid = api_daemon.proc.pid
    config = yaml.safe_load(api_daemon.config.read_text())
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**config, "socket": str(tmp_path / "other.sock")}))
    second = subprocess.run([sys.executable, "-m", "vmjobs", "--config", str(other), "serve"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"vmjob: another vmjob daemon (pid {pid}) already serves the spool {api_daemon.spool}")
    assert not (tmp_path / "other.sock").exists()
    api_daemon.client().status()  # the first one still answers
