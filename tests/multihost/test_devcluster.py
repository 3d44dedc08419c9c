"""The dev cluster itself: hosts with their own names and libvirtds, idempotent, removable."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.multihost.conftest import Cluster, leftovers
from vmjobs import devcluster


def test_each_host_answers_as_itself(cluster: Cluster) -> None:
    uuids = set()
    for index in (1, 2, 3):
        conn = libvirt.open(cluster.layout.uri(index))
        try:
            assert conn.getHostname() == f"h{index}"
            caps = ET.fromstring(conn.getCapabilities())
            uuids.add(caps.findtext("./host/uuid"))
        finally:
            conn.close()
    assert len(uuids) == 3, "every host must have its own host UUID (migration needs it)"


def test_hosts_command_sees_h1_to_h3(cluster: Cluster) -> None:
    shown = cluster.vmjob("hosts", "--json")
    assert shown.returncode == 0, shown.stderr
    names = [h["name"] for h in json.loads(shown.stdout)]
    assert names == ["h1", "h2", "h3"]


def test_up_again_keeps_healthy_hosts(cluster: Cluster) -> None:
    before = devcluster.status(cluster.layout.name)
    again = devcluster.up(cluster.layout.name, 3)
    assert [h.init_pid for h in again.hosts] == [h.init_pid for h in before.hosts]
    assert again.up
    env = subprocess.run([sys.executable, "-m", "vmjobs", "devcluster", "env", "--name",
                          cluster.layout.name], capture_output=True, text=True)
    assert env.stdout.strip() == f"export VMJOBS_CONFIG={cluster.config_path}"


def test_bad_input_is_one_line_and_leaves_nothing() -> None:
    for args in (["--hosts", "0"], ["--subnet", "8.8.8.0/24"], ["--name", "Bad-Name"]):
        proc = subprocess.run([sys.executable, "-m", "vmjobs", "devcluster", "up", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 1, proc
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not leftovers("dev") or devcluster.layout_of("dev") is not None


@pytest.mark.parametrize("hosts", [2])
def test_down_removes_everything(hosts: int) -> None:
    name = "mhd"
    try:
        state = devcluster.up(name, hosts, "10.231.2.0/24")
        assert state.up and len(state.hosts) == hosts
        assert leftovers(name), "the probe for leftovers must see a running cluster"
        # a guest-less host whose libvirtd was killed is rebuilt by the next up
        pid = devcluster.libvirtd_pid(state.layout, "h2")
        assert pid is not None
        subprocess.run(["kill", "-9", str(pid)], check=True)
        again = devcluster.up(name, hosts)
        assert again.up
    finally:
        assert devcluster.down(name)
    assert leftovers(name) == []
    assert devcluster.down(name) is False
