"""The configuration file: lookup order, the embedded default, what it may say (vmjobs.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vmjobs import config
from vmjobs.config import EmulatedNic, load, locate
from vmjobs.errors import ConfigError, NotFound, VmjobsError


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Neither the caller's $VMJOBS_CONFIG nor the machine's /etc file may leak into a test."""
    monkeypatch.delenv("VMJOBS_CONFIG", raising=False)
    system = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    return system


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def one_host(**host: Any) -> dict[str, Any]:
    return {"spool": "/srv/vmjobs", "hosts": [{"name": "a", "uri": "qemu:///system", **host}]}


# --- the embedded default and where the file is looked for -----------------------------------


def test_embedded_default_without_any_file() -> None:
    assert locate(None) is None
    cfg = load()
    assert cfg.path == config.EMBEDDED
    assert [(h.name, h.uri) for h in cfg.hosts] == [("local", "qemu:///system")]
    assert cfg.spool == Path("/var/lib/vmjobs")
    assert cfg.state_db == Path("/var/lib/vmjobs/state.db")
    assert cfg.virt_type == "auto"
    assert cfg.nic_backend == "vfio"
    local = cfg.host("local")
    assert local.reserved_cpus == frozenset()
    assert local.nic_allow == ()  # by default no host NIC is ever handed out


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      no_ambient_config: Path) -> None:
    system = write(no_ambient_config, {"spool": "/from/system"})
    env = write(tmp_path / "env.yaml", {"spool": "/from/env"})
    explicit = write(tmp_path / "explicit.yaml", {"spool": "/from/explicit"})

    assert load().spool == Path("/from/system")
    assert load().path == str(system)

    monkeypatch.setenv("VMJOBS_CONFIG", str(env))
    assert load().spool == Path("/from/env")

    cfg = load(str(explicit))
    assert cfg.spool == Path("/from/explicit")
    assert cfg.path == str(explicit)


def test_empty_env_variable_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMJOBS_CONFIG", "")
    assert load().path == config.EMBEDDED


def test_named_file_that_is_missing_is_an_error_not_the_default(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(VmjobsError, match=f"^{missing}: cannot read config"):
        load(str(missing))
    monkeypatch.setenv("VMJOBS_CONFIG", str(missing))
    with pytest.raises(VmjobsError, match=f"^{missing}: "):
        load()


def test_empty_file_means_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "")
    cfg = load(str(path))
    assert cfg.path == str(path)
    assert [h.name for h in cfg.hosts] == ["local"]
    assert cfg.spool == Path("/var/lib/vmjobs")


def test_full_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {
        "spool": "/srv/vmjobs",
        "virt_type": "qemu",
        "nic_backend": "emulated",
        "output_disk_size": "1G",
        "kvm_probe_timeout": 2.5,
        "hosts": [
            {"name": "n1", "uri": "qemu+ssh://n1/system", "reserved_cpus": "0,16",
             "reserved_memory": "4G", "labels": {"rack": "r1", "gen": 3}, "pool": "ci",
             "nics": ["0000:3B:00.0", "8086:1572", "0x8086:0x1521"],
             "emulated_nics": [{"name": "enic0", "node": 0}, {"name": "enic1", "node": 1}]},
            {"name": "n2", "uri": "qemu+tls://n2/system", "reserved_cpus": 0},
        ],
    })
    cfg = load(str(path))
    assert cfg.spool == Path("/srv/vmjobs")
    assert (cfg.virt_type, cfg.nic_backend) == ("qemu", "emulated")
    assert cfg.output_disk_mib == 1024
    assert cfg.kvm_probe_timeout_s == 2.5
    n1 = cfg.host("n1")
    assert n1.uri == "qemu+ssh://n1/system"
    assert n1.reserved_cpus == frozenset({0, 16})
    assert n1.reserved_memory_mib == 4096
    assert n1.labels == (("gen", "3"), ("rack", "r1"))
    assert n1.pools == ("ci",)
    assert n1.nic_allow == ("0000:3b:00.0", "8086:1572", "0x8086:0x1521")
    assert n1.emulated_nics == (EmulatedNic("enic0", 0), EmulatedNic("enic1", 1))
    n2 = cfg.host("n2")
    assert n2.reserved_cpus == frozenset({0})
    assert n2.pools == ("default",)


def test_a_host_in_several_pools(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"hosts": [
        {"name": "a", "uri": "qemu+tcp://a/system", "pool": ["lab", "ci", "ci"]},
        {"name": "b", "uri": "qemu+tcp://b/system", "pool": "ci"},
        {"name": "c", "uri": "qemu+tcp://c/system"}]})
    cfg = load(str(path))
    assert cfg.host("a").pools == ("ci", "lab")  # sorted, once each
    assert cfg.pools == {"ci": ("a", "b"), "default": ("c",), "lab": ("a",)}


def test_unknown_host_names_the_configured_ones() -> None:
    # NotFound, so `--json` says code "not_found" as it does for an unknown pool or job
    with pytest.raises(NotFound, match=r"^unknown host 'elsewhere' \(configured: local\)$"):
        load().host("elsewhere")


def test_pool_gives_its_members_or_names_the_pools_there_are(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"hosts": [
        {"name": "a", "uri": "qemu+tcp://a/system", "pool": ["lab", "ci"]},
        {"name": "b", "uri": "qemu+tcp://b/system", "pool": "ci"}]})
    cfg = load(str(path))
    assert cfg.pool("ci") == ("a", "b")
    with pytest.raises(NotFound, match=r"^no pool 'nope' \(pools: ci, lab\)$"):
        cfg.pool("nope")


# --- errors: file, key, problem, on one line ------------------------------------------------


BAD = [
    # (file content, key, words the problem must contain)
    ("spool: /x\nhosts:\n  - name: a\n    uri: [x\n", "line 5", "not valid YAML"),
    ("spool: /x\n\tvirt_type: kvm\n", "line 2", "not valid YAML"),
    ("- a\n- b\n", "(top level)", "must be a mapping"),
    ({"spools": "/x"}, "spools", "unknown key"),
    (one_host(cpus=4), "hosts[0].cpus", "unknown key"),
    (one_host(pool=[]), "hosts[0].pool", "a pool name or a list of pool names"),
    (one_host(pool=["ci", 3]), "hosts[0].pool", "a pool name or a list of pool names"),
    (one_host(pool="a b"), "hosts[0].pool", "a pool name or a list of pool names"),
    ({"virt_type": "xen"}, "virt_type", "must be one of kvm, qemu, auto, not 'xen'"),
    ({"nic_backend": "sriov"}, "nic_backend", "must be one of vfio, emulated"),
    ({"spool": "var/lib/vmjobs"}, "spool", "must be an absolute path"),
    ({"spool": ""}, "spool", "non-empty string"),
    ({"hosts": []}, "hosts", "at least one host"),
    ({"hosts": {"name": "a"}}, "hosts", "must be a list"),
    ({"hosts": ["local"]}, "hosts[0]", "must be a mapping"),
    ({"hosts": [{"name": "a"}]}, "hosts[0].uri", "is required"),
    ({"hosts": [{"uri": "qemu:///system"}]}, "hosts[0].name", "is required"),
    (one_host(name="a b"), "hosts[0].name", "not a valid host name"),
    ({"hosts": [{"name": "a", "uri": "x"}, {"name": "b", "uri": "y"},
                {"name": "a", "uri": "z"}]}, "hosts", "host name 'a' appears twice"),
    (one_host(nics=["eth0"]), "hosts[0].nics[0]", "neither a PCI address"),
    (one_host(nics=["0000:3b:00.0", "8086"]), "hosts[0].nics[1]", "'8086'"),
    (one_host(nics=["0000:3b:00.8"]), "hosts[0].nics[0]", "neither a PCI address"),
    (one_host(nics="8086:1572"), "hosts[0].nics", "must be a list"),
    (one_host(reserved_cpus="0-x"), "hosts[0].reserved_cpus", "invalid cpu list '0-x'"),
    (one_host(reserved_cpus="3-1"), "hosts[0].reserved_cpus", "invalid cpu list"),
    (one_host(reserved_cpus=[0, 1]), "hosts[0].reserved_cpus", "invalid cpu list"),
    (one_host(reserved_memory="lots"), "hosts[0].reserved_memory", "invalid size"),
    (one_host(labels=["rack"]), "hosts[0].labels", "mapping of names to strings"),
    (one_host(emulated_nics=["enic0"]), "hosts[0].emulated_nics[0]", "must be a mapping"),
    (one_host(emulated_nics=[{"name": "e0", "numa": 0}]), "hosts[0].emulated_nics[0].numa",
     "unknown key"),
    (one_host(emulated_nics=[{"node": 0}]), "hosts[0].emulated_nics[0].name", "is required"),
    (one_host(emulated_nics=[{"name": "e0", "node": -1}]), "hosts[0].emulated_nics[0].node",
     "integer >= 0"),
    (one_host(emulated_nics=[{"name": "e0", "node": "one"}]),
     "hosts[0].emulated_nics[0].node", "integer >= 0"),
    (one_host(emulated_nics=[{"name": "e0", "node": True}]),
     "hosts[0].emulated_nics[0].node", "integer >= 0"),
    (one_host(emulated_nics=[{"name": "e0", "node": 0}, {"name": "e0", "node": 1}]),
     "hosts[0].emulated_nics[1].name", "appears twice"),
    # The name becomes part of a device id that the domain metadata lists comma-separated.
    (one_host(emulated_nics=[{"name": "e0,e1", "node": 0}]), "hosts[0].emulated_nics[0].name",
     "not a valid NIC name"),
    ({"output_disk_size": 0}, "output_disk_size", "greater than zero"),
    ({"kvm_probe_timeout": 0}, "kvm_probe_timeout", "> 0"),
    ({"kvm_probe_timeout": "soon"}, "kvm_probe_timeout", "> 0"),
    ({"preemption": "sometimes"}, "preemption", "must be on or off"),
    ({"max_outbound_migrations": 0}, "max_outbound_migrations", "integer >= 1"),
]

# Hostile configs (issue 15): each gives exactly this one line, never a traceback.
SAME_URI = "hosts: 'a' and 'b' have the same libvirt URI"
HOSTILE = [
    # (file content: YAML text, a mapping, or raw bytes; the whole message after "<path>: ")
    ({"hosts": [{"name": "a", "uri": "qemu:///system"}, {"name": "b", "uri": "qemu:///system"}]},
     f"{SAME_URI} 'qemu:///system': one host, configured twice"),
    ({"hosts": [{"name": "a", "uri": "qemu:///system"},
                {"name": "b", "uri": "QEMU:///system/"}]},
     f"{SAME_URI} 'QEMU:///system/': one host, configured twice"),
    ({"hosts": [{"name": "a", "uri": "qemu+ssh://root@n1/system"},
                {"name": "b", "uri": "qemu+tcp://N1:16509/system"}]},
     f"{SAME_URI} 'qemu+tcp://N1:16509/system': one host, configured twice"),
    (b"spool: /x\nhosts:\n  - name: caf\xe9\n", "line 3: not UTF-8 text"),
    (one_host(reserved_cpus="0-1000000000"),
     "hosts[0].reserved_cpus: invalid cpu list '0-1000000000': cpu 1000000000 is beyond the "
     "largest cpu id Linux has (8191)"),
    (one_host(reserved_cpus="-1"), "hosts[0].reserved_cpus: invalid cpu list '-1': use e.g. "
     "0-3,^2,6"),
    ("kvm_probe_timeout: .nan\n",
     "kvm_probe_timeout: must be a number of seconds > 0 and <= 3600"),
    ("kvm_probe_timeout: .inf\n",
     "kvm_probe_timeout: must be a number of seconds > 0 and <= 3600"),
    ("request_timeout: .nan\n", "request_timeout: must be a number of seconds > 0 and <= 3600"),
    ("request_timeout: 0\n", "request_timeout: must be a number of seconds > 0 and <= 3600"),
    ("request_timeout: true\n",
     "request_timeout: must be a number of seconds > 0 and <= 3600"),
    ({"max_connections": 0}, "max_connections: must be an integer >= 1"),
    ({"max_connections_per_user": -5}, "max_connections_per_user: must be an integer >= 1"),
    ({"max_connections": 1e9}, "max_connections: must be an integer >= 1"),
    ("output_limit: 12Q\n", "output_limit: invalid output_limit '12Q': use a number of bytes "
     "or a size like 512M, 1.5G, 64G, or 'unlimited'"),
    ("output_limit: 0\n", "output_limit: invalid output_limit '0': must be greater than zero, "
     "or 'unlimited'"),
    ("output_limit: -1G\n", "output_limit: invalid output_limit '-1G': use a number of bytes "
     "or a size like 512M, 1.5G, 64G, or 'unlimited'"),
    ("output_limit: .nan\n", "output_limit: invalid output_limit 'nan': use a number of bytes "
     "or a size like 512M, 1.5G, 64G, or 'unlimited'"),
    ("output_limit: off\n", "output_limit: must be a size such as 1G or 'unlimited'"),
    ("output_limit: Unlimited\n", "output_limit: invalid output_limit 'Unlimited': use a "
     "number of bytes or a size like 512M, 1.5G, 64G, or 'unlimited'"),
]


@pytest.mark.parametrize(("content", "message"), HOSTILE,
                         ids=[f"{i}" for i in range(len(HOSTILE))])
def test_hostile_config_gives_one_line(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "hostile.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write(path, content)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: {message}"


def test_connection_settings_and_their_defaults(tmp_path: Path) -> None:
    default = load(str(write(tmp_path / "a.yaml", {})))
    assert (default.max_connections, default.max_connections_per_user,
            default.request_timeout_s) == (512, 64, 10.0)
    cfg = load(str(write(tmp_path / "b.yaml", {"max_connections": 100,
                                               "max_connections_per_user": 5,
                                               "request_timeout": 2.5})))
    assert (cfg.max_connections, cfg.max_connections_per_user, cfg.request_timeout_s) == (
        100, 5, 2.5)


def test_different_hosts_with_alike_uris_are_accepted(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path / "c.yaml", {"hosts": [
        {"name": "sys", "uri": "qemu:///system"}, {"name": "ses", "uri": "qemu:///session"},
        {"name": "n1", "uri": "qemu+tcp://n1/system"},
        {"name": "n1b", "uri": "qemu+tcp://n1:16600/system"},
        {"name": "n2", "uri": "qemu+ssh://n2/system"}]})))
    assert [h.name for h in cfg.hosts] == ["sys", "ses", "n1", "n1b", "n2"]


def test_missing_admin_group_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"admin_group": "vmjobs-no-such-group-here"})
    cfg = load(str(path))
    assert config.system_warnings(cfg) == [
        f"{path}: admin_group: no group 'vmjobs-no-such-group-here' on this system: only root "
        "acts on every job"]
    assert config.system_warnings(load(str(write(tmp_path / "d.yaml", {"admin_group": "root"})))
                                  ) == []


@pytest.mark.parametrize(("text", "limit"), [
    ("", 1 << 30),  # the default: 1 GiB
    ("output_limit: 1M\n", 1 << 20),
    ("output_limit: 1.5G\n", 1536 << 20),
    ("output_limit: 3000000\n", 3 << 20),  # bytes, rounded up to whole MiB
    ("output_limit: 20 GiB\n", 20 << 30),
    ("output_limit: unlimited\n", None),
])
def test_output_limit(tmp_path: Path, text: str, limit: int | None) -> None:
    assert load(str(write(tmp_path / "c.yaml", text))).output_limit_bytes == limit


def test_preemption_and_migration_limit(tmp_path: Path) -> None:
    assert (load(str(write(tmp_path / "a.yaml", {}))).preemption is False)
    config = load(str(write(tmp_path / "b.yaml", "preemption: on\nmax_outbound_migrations: 3\n")))
    assert config.preemption is True and config.max_outbound_migrations == 3


@pytest.mark.parametrize(("content", "key", "problem"), BAD,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD)])
def test_error_names_file_key_and_problem(tmp_path: Path, content: Any, key: str,
                                          problem: str) -> None:
    path = write(tmp_path / "bad config.yaml", content)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    error = info.value
    message = str(error)
    assert "\n" not in message
    assert (error.path, error.key) == (str(path), key)
    assert message.startswith(f"{path}: {key}: ")
    assert problem in error.problem


def test_error_from_env_file_names_that_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "env.yaml", {"virt_type": "xen"})
    monkeypatch.setenv("VMJOBS_CONFIG", str(path))
    with pytest.raises(ConfigError, match=f"^{path}: virt_type: "):
        load()


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", one_host(reserved_cpu="0"))
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "reserved_cpus" in info.value.problem
    assert "emulated_nics" in info.value.problem


def test_borrow_settings_and_their_defaults(tmp_path: Path) -> None:
    assert load(str(write(tmp_path / "none.yaml", one_host()))).borrow is None  # no lending
    loaded = load(str(write(tmp_path / "empty.yaml", "spool: /srv/vmjobs\nborrow: {}\n")))
    assert loaded.borrow == config.Borrow(0.1, 600.0, 5.0, "off")
    given = load(str(write(tmp_path / "given.yaml", {
        **one_host(), "usage_sample_interval": "10s",
        "borrow": {"idle_below": 0.25, "for": "2m", "give_back_within": "8s",
                   "memory": "off"}})))
    assert given.borrow == config.Borrow(0.25, 120.0, 8.0, "off")
    # owners with loans are read at a quarter of give_back_within, within [0.5 s, interval]
    assert given.borrow.fast_interval_s(10.0) == 2.0
    assert given.borrow.fast_interval_s(1.0) == 1.0
    assert config.Borrow(give_back_within_s=1.0).fast_interval_s(10.0) == 0.5
    bare_off = load(str(write(tmp_path / "off.yaml",
                              "spool: /srv/vmjobs\nborrow:\n  memory: off\n")))
    assert bare_off.borrow is not None and bare_off.borrow.memory == "off"
    assert not bare_off.borrow.balloon


def test_memory_balloon_lending_and_the_balloon_period(tmp_path: Path) -> None:
    lends = load(str(write(tmp_path / "balloon.yaml", {
        **one_host(), "usage_sample_interval": "10s",
        "borrow": {"memory": "balloon", "memory_margin": "128M", "give_back_within": "6s"}})))
    assert lends.borrow == config.Borrow(memory="balloon", memory_margin_mib=128,
                                         give_back_within_s=6.0)
    assert lends.borrow.balloon
    # lending memory: balloons report as often as lending owners are read (6 s / 4, rounded up)
    assert lends.balloon_period_s() == 2
    # every guest of a sampling daemon has a balloon, reporting at the sampling interval
    plain = load(str(write(tmp_path / "plain.yaml", {**one_host(),
                                                     "usage_sample_interval": 2.5})))
    assert plain.balloon_period_s() == 3
    off = load(str(write(tmp_path / "off.yaml", {**one_host(), "usage_sample_interval": 0})))
    assert off.balloon_period_s() is None
    assert load(str(write(tmp_path / "cores.yaml", {
        **one_host(), "borrow": {"memory": "off"}}))).borrow.memory_margin_mib == 256


@pytest.mark.parametrize(("section", "key", "problem"), [
    ({"idle_below": 1.5}, "borrow.idle_below", "fraction of a core"),
    ({"idle_below": 0}, "borrow.idle_below", "fraction of a core"),
    ({"idle_below": True}, "borrow.idle_below", "fraction of a core"),
    ({"idle_below": float("nan")}, "borrow.idle_below", "fraction of a core"),
    ({"for": "forever"}, "borrow.for", "duration"),
    ({"give_back_within": "2h"}, "borrow.give_back_within", "at most 1h"),
    ({"give_back_within": 0}, "borrow.give_back_within", "duration"),
    ({"memory": "all"}, "borrow.memory", "must be off or balloon"),
    ({"memory": "balloon", "memory_margin": "lots"}, "borrow.memory_margin", "invalid size"),
    ({"lend": True}, "borrow.lend", "unknown key"),
    ("on", "borrow", "must be a mapping"),
])
def test_bad_borrow_settings_name_the_key(tmp_path: Path, section: Any, key: str,
                                          problem: str) -> None:
    path = write(tmp_path / "bad.yaml", {**one_host(), "borrow": section})
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.key, "\n" in str(info.value)) == (key, False)
    assert problem in info.value.problem


def test_borrowing_needs_the_sampler(tmp_path: Path) -> None:
    path = write(tmp_path / "off.yaml", {**one_host(), "usage_sample_interval": 0,
                                         "borrow": {"for": "1m"}})
    with pytest.raises(ConfigError, match="usage_sample_interval above 0"):
        load(str(path))
