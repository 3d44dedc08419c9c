"""Hardware profiles (vmjobs.spec.make_profile / apply_profile, config `profiles:`): a profile
fills what the spec leaves unset, options given with it win, labels merge, the name is kept,
and every value is checked as a spec's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from placement import NumaPolicy, ThreadPolicy
from vmjobs.cli.options import spec_from_options
from vmjobs.config import parse as parse_config
from vmjobs.errors import ConfigError
from vmjobs.spec import SpecError, make_profile, parse

PROFILES = {"2nic": make_profile("2nic", {"cpus": 2, "mem": "1G", "nics": 2, "numa": "strict",
                                          "threads": "isolate", "hugepages": "2M",
                                          "pool": "lab", "labels": {"nic": "x710", "rack": "a"}})}


def test_a_profile_fills_what_the_spec_leaves_unset() -> None:
    spec = parse({"argv": ["true"], "profile": "2nic"}, profiles=PROFILES)
    assert (spec.cpus, spec.mem, spec.nics, spec.numa, spec.threads, spec.hugepages,
            spec.pool) == (2, 1024, 2, NumaPolicy.STRICT, ThreadPolicy.ISOLATE, "2M", "lab")
    assert dict(spec.labels) == {"nic": "x710", "rack": "a"}
    assert spec.profile == "2nic" and spec.to_dict()["profile"] == "2nic"
    # the stored form re-parses to the same spec without the profiles (already applied)
    assert parse(spec.to_dict()) == spec


def test_fields_given_with_the_profile_win_and_labels_merge() -> None:
    spec = parse({"argv": ["true"], "profile": "2nic", "cpus": 4, "numa": "prefer",
                  "labels": {"rack": "b"}}, profiles=PROFILES)
    assert (spec.cpus, spec.numa, spec.nics) == (4, NumaPolicy.PREFER, 2)
    assert dict(spec.labels) == {"nic": "x710", "rack": "b"}


def _options(**given: Any) -> dict[str, Any]:
    return {"url": None, **given}


def test_command_line_options_win_over_the_profile_and_the_yaml(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("profile: 2nic\nnics: 1\nargv: [sh, -c, nproc]\n")
    config = parse_config({"hosts": [{"name": "h", "uri": "test:///default"}],
                           "profiles": {"2nic": {"cpus": 2, "mem": "1G", "nics": 2,
                                                 "labels": {"rack": "a"}}}}, "c.yaml")

    class Obj:
        pass

    obj = Obj()
    obj.config = config  # type: ignore[attr-defined]
    with click.Context(click.Command("run"), obj=obj):
        from_yaml = spec_from_options(_options(), job)
        assert (from_yaml.cpus, from_yaml.mem, from_yaml.nics) == (2, 1024, 1)  # yaml wins
        typed = spec_from_options(_options(profile="2nic", cpus="3", label=("rack=b",),
                                           argv=("true",)))
        assert (typed.cpus, typed.nics, dict(typed.labels)) == (3, 2, {"rack": "b"})
        assert typed.profile == "2nic"
        with pytest.raises(SpecError, match="unknown profile 'nope'.*profiles: 2nic"):
            spec_from_options(_options(profile="nope", argv=("true",)))


def test_unknown_profile_and_bad_values_are_refused() -> None:
    with pytest.raises(SpecError, match="unknown profile 'x'"):
        parse({"argv": ["true"], "profile": "x"}, profiles=PROFILES)
    with pytest.raises(SpecError, match="unknown profile 'x'.*none configured"):
        parse({"argv": ["true"], "profile": "x"}, profiles={})
    with pytest.raises(SpecError, match="unknown field.*cores"):
        make_profile("p", {"cores": 2})
    with pytest.raises(SpecError, match="mem"):
        make_profile("p", {"mem": "12"})
    with pytest.raises(SpecError, match="not a valid profile name"):
        make_profile("a b", {})
    for bad in ({"p": {"argv": ["x"]}}, {"p": {"cpus": "many"}}, {"p": []}, ["p"]):
        with pytest.raises(ConfigError, match=r"^c.yaml: profiles"):
            parse_config({"profiles": bad}, "c.yaml")

