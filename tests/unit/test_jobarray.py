"""Job arrays in the spec: `--array`, YAML and API field `array` (vmjobs.jobarray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmjobs.cli.options import spec_from_options
from vmjobs.jobarray import (
    MAX_INDEX,
    JobArray,
    array_env,
    array_of,
    member_id,
    member_spec,
    parse_array,
)
from vmjobs.spec import SpecError, parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "indices", "limit", "canonical"), [
    ("1-100%10", tuple(range(1, 101)), 10, "1-100%10"),
    ("1,3,5-7", (1, 3, 5, 6, 7), None, "1,3,5-7"),
    ("7,5-6,0", (0, 5, 6, 7), None, "0,5-7"),
    ("0", (0,), None, "0"),
    (f"0-{MAX_INDEX}", tuple(range(MAX_INDEX + 1)), None, f"0-{MAX_INDEX}"),
    ("4-4%1", (4,), 1, "4%1"),
])
def test_indices_limit_and_canonical_text(text: str, indices: tuple[int, ...],
                                          limit: int | None, canonical: str) -> None:
    array = parse_array(text)
    assert array == JobArray(indices, limit)
    assert array.text() == canonical
    assert parse_array(array.text()) == array


@pytest.mark.parametrize(("text", "problem"), [
    ("", "not an index list"), ("a-b", "not an index list"), ("1-", "not an index"),
    ("-3", "not an index"), ("1,,2", "not an index"), ("5-2", "ends before it starts"),
    (f"0-{MAX_INDEX + 1}", "indices go from 0 to 1000"), ("99999999", "not an index"),
    ("1-3,2", "index 2 is given twice"), ("1-10%0", "%N must be from 1"),
    ("1-10%", "not an index list"), ("1 - 3", "not an index list"),
    ("1-3%2%2", "not an index list"),
])
def test_bad_array_texts_are_refused_as_usage_errors(text: str, problem: str) -> None:
    with pytest.raises(SpecError, match=problem) as caught:
        parse({"argv": ["true"], "array": text})
    assert str(caught.value).startswith("array ")
    assert "\n" not in str(caught.value)


def test_array_field_types_round_trip_and_conflicts() -> None:
    spec = parse({"argv": ["true"], "array": "1-5%2"})
    assert spec.array == JobArray((1, 2, 3, 4, 5), 2)
    assert spec.to_dict()["array"] == "1-5%2"
    assert parse(json.loads(json.dumps(spec.to_dict()))) == spec
    assert parse({"argv": ["true"]}).to_dict()["array"] is None
    with pytest.raises(SpecError, match=r"array must be text like 1-100"):
        parse({"argv": ["true"], "array": 5})  # YAML's 5 is an int: say what to write
    with pytest.raises(SpecError, match="--no-wait cannot be given with --array"):
        parse({"argv": ["true"], "array": "1-3", "no_wait": True})
    for name in ("VMJOB_ARRAY_INDEX", "VMJOB_ARRAY_ID"):
        with pytest.raises(SpecError, match=f"--env {name} is set by vmjob"):
            parse({"argv": ["true"], "env": {name: "1"}})


def test_option_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^--array '1-0'"):
        spec_from_options({"argv": ("true",), "array": "1-0"})
    job = tmp_path / "job.yaml"
    job.write_text("argv: [\"true\"]\narray: 1-3%1\n")
    assert spec_from_options({}, job).array == JobArray((1, 2, 3), 1)


def test_members_ids_specs_and_guest_environment() -> None:
    stored = member_spec({"argv": ["true"], "array": "3-4%1"}, "3f9a1c2e", 4, 1)
    assert member_id("3f9a1c2e", 4) == "3f9a1c2e_4"
    assert array_of(stored) == ("3f9a1c2e", 1)
    assert array_env(stored) == {"VMJOB_ARRAY_ID": "3f9a1c2e", "VMJOB_ARRAY_INDEX": "4"}
    assert array_of({"argv": ["true"]}) is None and array_env({"argv": ["true"]}) == {}


def test_submit_with_a_bad_array_exits_2_with_one_line_before_any_daemon(
        tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmjobs", "submit", "--array", "1-2000", "--", "true"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "VMJOBS_URL": str(tmp_path / "no.sock")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vmjob: --array '1-2000': indices go from 0 to 1000 (at most 1001 jobs in an array)"]


def test_the_guest_gets_the_array_variables_that_a_user_env_may_not_set() -> None:
    from vmjobs.errors import VmjobsError
    from vmjobs.guest_protocol import JobSpec, check_spec, job_env

    stored = member_spec({"argv": ["true"]}, "3f9a1c2e", 7, None)
    spec = JobSpec("3f9a1c2e_7", ("true",), {"A": "1"}, 1, 256, vmjob_env=array_env(stored))
    check_spec(spec)  # vmjob's own variables pass the protocol's checks
    assert job_env(spec) == {"VMJOB_ID": "3f9a1c2e_7", "VMJOB_CPUS": "1", "VMJOB_MEM": "256",
                             "VMJOB_ARRAY_ID": "3f9a1c2e", "VMJOB_ARRAY_INDEX": "7", "A": "1"}
    with pytest.raises(VmjobsError, match="VMJOB_"):
        check_spec(JobSpec("j", ("true",), {"VMJOB_ARRAY_INDEX": "1"}, 1, 256))
    with pytest.raises(VmjobsError, match="bad vmjob variable"):
        check_spec(JobSpec("j", ("true",), {}, 1, 256, vmjob_env={"PATH": "/x"}))
