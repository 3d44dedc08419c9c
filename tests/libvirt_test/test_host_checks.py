"""Config entries the host contradicts (vmjobs.host_checks), read from libvirt's test driver:
two NUMA nodes, cpus 0-7 and 8-15, 2 GiB and 4 GiB, and no host UUID."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
import yaml
from click.testing import CliRunner

from vmjobs.cli import cli
from vmjobs.config import EmulatedNic, HostConfig
from vmjobs.host_checks import host_uuid, host_warnings, same_host
from vmjobs.virt.inventory import read_topology

OK = HostConfig(name="t", uri="test:///default", reserved_cpus=frozenset({0, 8}),
                reserved_memory_mib=1024, emulated_nics=(EmulatedNic("e0", 1),))

CASES = [
    # (config, the warnings, in order)
    (OK, []),
    (HostConfig("t", "test:///default", reserved_cpus=frozenset({0, 16, 17, 40})),
     ["host t: reserved_cpus: cpus 16-17,40 are not on this host (it has 0-15)"]),
    (HostConfig("t", "test:///default", reserved_cpus=frozenset(range(16))),
     ["host t: reserved_cpus: every cpu of this host is reserved: no job can run here"]),
    (HostConfig("t", "test:///default", reserved_cpus=frozenset(range(20))),
     ["host t: reserved_cpus: cpus 16-19 are not on this host (it has 0-15)",
      "host t: reserved_cpus: every cpu of this host is reserved: no job can run here"]),
    (HostConfig("t", "test:///default", reserved_memory_mib=100000 * 1024),
     ["host t: reserved_memory: 100000 GiB is all of this host's 6 GiB or more: no job can "
      "run here"]),
    (HostConfig("t", "test:///default", emulated_nics=(EmulatedNic("e0", 0),
                                                       EmulatedNic("far", 99))),
     ["host t: emulated_nics: far is on NUMA node 99, which this host lacks (nodes 0-1): it "
      "is never offered"]),
]


@pytest.mark.parametrize(("host", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_warnings_from_the_hosts_own_topology(default_conn: libvirt.virConnect,
                                              host: HostConfig, expected: list[str]) -> None:
    assert host_warnings(host, read_topology(default_conn).nodes, "emulated") == expected


def test_emulated_nics_are_not_checked_under_vfio(default_conn: libvirt.virConnect) -> None:
    host = HostConfig("t", "test:///default", emulated_nics=(EmulatedNic("far", 99),))
    assert host_warnings(host, read_topology(default_conn).nodes, "vfio") == []


def test_vmjob_hosts_shows_the_warnings(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "spool": str(tmp_path / "spool"), "nic_backend": "emulated",
        "hosts": [{"name": "t", "uri": "test:///default", "reserved_cpus": "0-15,40",
                   "reserved_memory": "100000G",
                   "emulated_nics": [{"name": "far", "node": 99}]}]}))
    result = CliRunner().invoke(cli, ["--config", str(config), "hosts"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: host t: reserved_cpus: cpu 40 is not on this host (it has 0-15)",
        "warning: host t: reserved_cpus: every cpu of this host is reserved: no job can run "
        "here",
        "warning: host t: reserved_memory: 100000 GiB is all of this host's 6 GiB or more: no "
        "job can run here",
        "warning: host t: emulated_nics: far is on NUMA node 99, which this host lacks (nodes "
        "0-1): it is never offered"]
    as_json = CliRunner().invoke(cli, ["--config", str(config), "hosts", "--json"])
    assert len(yaml.safe_load(as_json.stdout)[0]["warnings"]) == 4


def test_one_libvirt_host_under_two_names_is_found_by_its_uuid() -> None:
    caps = "<capabilities><host><uuid>70E4BA20-5e01-47a1-bd8d-c2dc416c1ca9</uuid></host>" \
           "</capabilities>"
    uuid = host_uuid(caps)
    assert uuid == "70e4ba20-5e01-47a1-bd8d-c2dc416c1ca9"
    assert same_host("b", uuid, {"a": uuid}) == "a"
    assert same_host("a", uuid, {"a": uuid}) is None  # itself (a reconnect)
    assert same_host("b", None, {"a": None}) is None  # drivers without a UUID: no claim
    assert host_uuid("<capabilities><host/></capabilities>") is None
