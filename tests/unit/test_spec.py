"""The job spec (vmjobs.spec): one parser for options, -f job.yaml and the API, strict types."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from placement import NumaPolicy, Request, ThreadPolicy
from vmjobs.cli.options import read_spec_file, spec_from_options
from vmjobs.errors import UsageError
from vmjobs.spec import MAX_DURATION_S, Spec, SpecError, parse, time_limit_of, wait_timeout_of

FULL = {
    "argv": ["sh", "-c", "echo hi"], "name": "sim run 3", "env": {"A": "1"}, "cpus": 4,
    "mem": "2G", "nics": 2,
    "numa": "prefer", "threads": "isolate", "hugepages": "1G", "labels": {"rack": "r1"},
    "mem_nodes": True,
    "host": "h1", "pool": "gpu", "image": "default", "priority": -3, "preemptible": True,
    "time_limit": "1h30m", "wait_timeout": 60, "no_wait": False, "input": "tok",
    "output": "/tmp/out",
}


def test_a_full_spec_and_its_request() -> None:
    spec = parse(FULL)
    assert spec.mem == 2048 and spec.time_limit == 5400.0 and spec.wait_timeout == 60.0
    assert spec.request() == Request(
        cpus=4, memory_mib=2048, nics=2, numa=NumaPolicy.PREFER, threads=ThreadPolicy.ISOLATE,
        hugepage_kib=1 << 20, host="h1", pool="gpu", labels=(("rack", "r1"),), priority=-3,
        preemptible=True, mem_nodes=True)


def test_the_canonical_form_parses_back_to_the_same_spec_through_json() -> None:
    spec = parse(FULL)
    assert parse(json.loads(json.dumps(spec.to_dict()))) == spec
    minimal = parse({"argv": ["true"]})
    assert minimal == Spec(argv=("true",))
    assert parse(minimal.to_dict()) == minimal


def test_a_name_is_kept_as_given_and_optional() -> None:
    assert parse({"argv": ["x"], "name": "sweep α-7 (retry)"}).name == "sweep α-7 (retry)"
    assert parse({"argv": ["x"], "name": "x" * 100}).name == "x" * 100
    assert parse({"argv": ["x"]}).name is None
    assert spec_from_options({"argv": ("true",), "name": "nightly"}).name == "nightly"


def test_stored_records_from_before_the_spec_stay_readable() -> None:
    assert time_limit_of({"argv": ["x"], "timeout_s": 60}) == 60.0
    assert time_limit_of({"argv": ["x"], "time_limit": 7.5}) == 7.5
    assert time_limit_of({"argv": ["x"], "timeout_s": None}) is None
    assert wait_timeout_of({"wait_timeout_s": 5}) == 5.0
    assert wait_timeout_of({"wait_timeout": 0.5}) == 0.5


# Each case: the field's value as YAML/JSON gives it, and the start of the one-line refusal.
REFUSED = [
    ({}, "no command given: put it after --"),
    ({"argv": []}, "no command given"),
    ({"argv": "echo hi"}, "argv must be a list of strings"),
    ({"argv": ["a\0b"]}, "argument 'a\\x00b' of the command contains a NUL byte"),
    ({"env": {"A": "x\0y"}}, "env contains a NUL byte"),
    ({"env": {"A B": "1"}}, "invalid --env name 'A B'"),
    ({"env": {"VMJOB_ID": "1"}}, "--env VMJOB_ID is set by vmjob"),
    ({"env": {"A": 1}}, "env must map names to strings"),
    ({"cpus": 0}, "cpus must be an integer from 1 to 4096, not 0"),
    ({"cpus": True}, "cpus must be an integer from 1 to 4096, not True"),
    ({"cpus": "2"}, "cpus must be an integer from 1 to 4096, not '2'"),
    ({"nics": 17}, "nics must be an integer from 0 to 16"),
    ({"priority": "high"}, "priority must be an integer from -1000000 to 1000000, not 'high'"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"priority": 10**30}, "priority must be an integer"),
    ({"preemptible": "no"}, "preemptible must be true or false, not 'no'"),
    ({"preemptible": 0}, "preemptible must be true or false, not 0"),
    ({"no_wait": "yes"}, "no_wait must be true or false"),
    ({"mem_nodes": "true"}, "mem_nodes must be true or false, not 'true'"),
    ({"time_limit": math.nan}, "time_limit must be a positive number of seconds, not nan"),
    ({"time_limit": math.inf}, "time_limit must be a positive number of seconds, not inf"),
    ({"time_limit": "nan"}, "invalid time_limit 'nan'"),
    ({"time_limit": 0}, "time_limit must be a positive number of seconds"),
    ({"time_limit": True}, "time_limit must be a duration"),
    ({"time_limit": "300000d"}, "time_limit '300000d' is longer than the longest supported"),
    ({"wait_timeout": MAX_DURATION_S + 1}, "wait_timeout 31622401 is longer than"),
    ({"no_wait": True, "wait_timeout": 5}, "give either --no-wait or --wait-timeout, not both"),
    ({"mem": 1024}, "mem 1024 bytes is too small to boot a guest (at least 128M); "
                    "did you mean 1024M?"),
    ({"mem": "1024"}, "mem 1024 bytes is too small to boot a guest (at least 128M); "
                      "did you mean 1024M?"),
    ({"mem": "64M"}, "mem 64M is too small to boot a guest (at least 128M)"),
    ({"mem": "12Q"}, "invalid mem '12Q'"),
    ({"mem": 2.5e9}, "mem must be a size"),
    ({"mem": math.nan}, "mem must be a size"),
    ({"mem": "9" * 400}, "invalid mem '999"),
    ({"mem": "4096T"}, "mem '4096T' is larger than any host"),
    ({"numa": "loose"}, "numa must be one of strict, prefer, any, not 'loose'"),
    ({"threads": "shared"}, "threads must be one of dedicated, isolate"),
    ({"hugepages": "3M"}, "hugepages must be one of 2M, 1G, not '3M'"),
    ({"labels": {"rack": 3}}, "labels must map names to strings"),
    ({"labels": {"a b": "x"}}, "invalid --label name 'a b'"),
    ({"host": ""}, "host must be a non-empty string"),
    ({"image": "a\0"}, "image contains a NUL byte"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"name": 3}, "name must be a non-empty string"),
    ({"name": "a\0b"}, "name contains a NUL byte"),
    ({"name": "a\nb"}, "name 'a\\nb' has a control character"),
    ({"name": "tab\there"}, "name 'tab\\there' has a control character"),
    ({"name": "\x1b[31mred"}, "name '\\x1b[31mred' has a control character"),
    ({"name": "x" * 101}, "name is 101 characters long; at most 100"),
    ({"owner": "root"}, "unknown field(s) owner (allowed: argv, name, env"),
    ({"memory_mib": 256}, "unknown field(s) memory_mib (now: mem)"),
    ({"time_limit_s": 6}, "unknown field(s) time_limit_s (now: time_limit)"),
    ({"command": "x"}, "unknown field(s) command (now: argv)"),
]


@pytest.mark.parametrize("fields, message", REFUSED)
def test_bad_fields_are_refused_with_one_line_as_usage_errors(fields: dict[str, object],
                                                              message: str) -> None:
    body = {"argv": ["x"], **fields} if "argv" not in fields and fields else fields
    with pytest.raises(SpecError) as info:
        parse(body)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


@pytest.mark.parametrize(("fields", "line"), [
    ({"mem_nodes": True, "numa": "strict"},
     "memory-only nodes (--mem-nodes) need --numa prefer or any: strict keeps memory on the "
     "node of the job's cpus"),
    ({"hugepages": "1G", "mem": "1.5G"}, "1.5 GiB is not a whole number of 1 GiB hugepages"),
    ({"hugepages": "1G"}, "256 MiB is not a whole number of 1 GiB hugepages"),
])
def test_fields_that_contradict_each_other_are_a_usage_error(fields: dict[str, object],
                                                             line: str) -> None:
    """Not exit 1 "does not fit" from the engine, after connecting to every host: the spec
    itself is wrong, whatever the cluster, so it is refused where the spec is read."""
    with pytest.raises(SpecError) as info:
        parse({"argv": ["true"], **fields})
    assert str(info.value) == line


def test_command_line_text_is_converted_and_named_by_its_option() -> None:
    spec = spec_from_options({"argv": ("true",), "cpus": "2", "memory": "512M",
                              "label": ("rack=r1", "zone=a"), "env": ("A=1",),
                              "threads": "isolate", "hugepages": "2M", "timeout": "90",
                              "mem_nodes": True})
    assert (spec.cpus, spec.mem, spec.time_limit) == (2, 512, 90.0)
    assert dict(spec.labels) == {"rack": "r1", "zone": "a"} and dict(spec.env) == {"A": "1"}
    assert spec.request().hugepage_kib == 2048 and spec.request().mem_nodes
    for params, message in [
        ({"cpus": "four"}, "--cpus must be an integer from 1 to 4096, not 'four'"),
        ({"memory": "1024"}, "--mem 1024 bytes is too small to boot a guest (at least 128M); "
                             "did you mean 1024M?"),
        ({"memory": "12Q"}, "invalid --mem '12Q'"),
        ({"priority": "high"}, "--priority must be an integer"),
        ({"time_limit": "300000d"}, "--time-limit '300000d' is longer than the longest"),
        ({"timeout": "300000d"}, "--timeout '300000d' is longer than the longest"),
        ({"timeout": "1h", "time_limit": "2h"}, "--timeout and --time-limit are the same"),
        ({"label": ("rack",)}, "invalid --label 'rack': use NAME=VALUE"),
        ({"env": ("NOEQUALS",)}, "invalid --env 'NOEQUALS': use NAME=VALUE"),
        ({"env": ("A=x\0",)}, "--env contains a NUL byte"),
        ({"hugepages": "4K"}, "--hugepages must be one of 2M, 1G"),
        ({"name": "a\tb"}, "--name 'a\\tb' has a control character"),
    ]:
        with pytest.raises(SpecError) as info:
            spec_from_options({"argv": ("true",), **params})
        assert str(info.value).startswith(message), (params, str(info.value))


def test_yaml_types_are_kept_strict_and_options_win(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"argv": ["./run"], "mem": "1G", "cpus": 2,
                                   "input": "data", "time_limit": "6s",
                                   "labels": {"rack": "r1"}}))
    assert read_spec_file(job)["input"] == str(tmp_path / "data")
    spec = spec_from_options({"cpus": "3"}, job)
    assert (spec.argv, spec.cpus, spec.mem, spec.time_limit) == (("./run",), 3, 1024, 6.0)
    assert spec_from_options({"argv": ("other",)}, job).argv == ("other",)
    # YAML 1.1 reads an unquoted `no` as false (fine); the string "no" is refused
    job.write_text('argv: [x]\npreemptible: "no"\n')
    with pytest.raises(SpecError, match=r"^-f .*job.yaml: preemptible must be true or false"):
        spec_from_options({}, job)
    job.write_text("argv: [x]\npreemptible: no\n")
    assert spec_from_options({}, job).preemptible is False
    job.write_text("argv: [x]\npriority: high\n")
    with pytest.raises(SpecError, match=r"^-f .*: priority must be an integer"):
        spec_from_options({}, job)
    job.write_text("argv: [x]\ntime_limit: .nan\n")
    with pytest.raises(SpecError, match="time_limit must be a positive number of seconds"):
        spec_from_options({}, job)
    job.write_text("- not a mapping\n")
    with pytest.raises(SpecError, match="must be a mapping of spec fields"):
        spec_from_options({}, job)


def test_borrow_implies_preemptible_and_no_lend_is_kept() -> None:
    spec = parse({"argv": ["true"], "borrow": True})
    assert spec.borrow and not spec.preemptible and spec.request().preemptible
    assert parse(spec.to_dict()) == spec
    assert parse({"argv": ["true"], "no_lend": True}).no_lend
    assert not parse({"argv": ["true"]}).request().preemptible


def test_borrow_and_no_lend_together_are_refused_in_one_line() -> None:
    with pytest.raises(SpecError, match="^give either --borrow or --no-lend, not both"):
        parse({"argv": ["true"], "borrow": True, "no_lend": True})
    with pytest.raises(SpecError, match="no_lend must be true or false"):
        parse({"argv": ["true"], "no_lend": "yes"})


def test_borrow_and_no_lend_from_the_command_line() -> None:
    spec = spec_from_options({"borrow": True, "argv": ("true",)})
    assert spec.borrow and spec.request().preemptible
    assert spec_from_options({"no_lend": True, "argv": ("true",)}).no_lend
