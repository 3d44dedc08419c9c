"""The same bad job spec gets the same one line and exit code 2 whether `vmjob run` runs it
directly (no daemon) or through a daemon (`run`, `submit`), and a 400 with that message at
the API. All are refused before anything is created: no job row, no guest. Run under the
guest-test lock (the daemon fixture builds the image once)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon.conftest import Daemon, our_domains
from vmjobs.client import ApiFailure

# command-line options -> the line after "vmjob: "
OPTION_CASES = {
    "mem in bytes": (["--mem", "1024"], "--mem 1024 bytes is too small to boot a guest "
                                        "(at least 128M); did you mean 1024M?"),
    "mem unit": (["--mem", "12Q"], "invalid --mem '12Q': use a number of bytes or a size "
                                   "like 512M, 1.5G, 64G"),
    "time limit too long": (["--timeout", "300000d"],
                            "--timeout '300000d' is longer than the longest supported (366d)"),
    "priority words": (["--priority", "high"],
                       "--priority must be an integer from -1000000 to 1000000, not 'high'"),
    "cpus zero": (["--cpus", "0"], "--cpus must be an integer from 1 to 4096, not 0"),
    "threads": (["--threads", "shared"],
                "--threads must be one of dedicated, isolate, not 'shared'"),
    "hugepages": (["--hugepages", "3M"], "--hugepages must be one of 2M, 1G, not '3M'"),
    "label": (["--label", "rack"], "invalid --label 'rack': use NAME=VALUE"),
    "env reserved": (["--env", "VMJOB_ID=x"],
                     "--env VMJOB_ID is set by vmjob and cannot be overridden"),
}
# -f job.yaml contents (and the same fields as an API body) -> the line after "-f FILE: "
FILE_CASES = {
    "boolean as a string": ({"preemptible": "no"}, "preemptible must be true or false, "
                                                   "not 'no'"),
    "priority words": ({"priority": "high"}, "priority must be an integer from -1000000 to "
                                             "1000000, not 'high'"),
    "NaN": ({"time_limit": float("nan")}, "time_limit must be a positive number of seconds, "
                                          "not nan"),
    "Infinity": ({"wait_timeout": float("inf")}, "wait_timeout must be a positive number of "
                                                 "seconds, not inf"),
    "mem in bytes": ({"mem": 1024}, "mem 1024 bytes is too small to boot a guest (at least "
                                    "128M); did you mean 1024M?"),
    "env NUL": ({"env": {"A": "x\0y"}}, "env contains a NUL byte"),
}
NUL_ARGV = "argument 'a\\x00b' of the command contains a NUL byte"


@pytest.fixture(scope="module")
def daemon(make_daemon: Any) -> Iterator[Daemon]:
    d = make_daemon("spec-modes")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def direct_config(daemon: Daemon) -> Path:
    """The daemon's config with a socket nobody listens on: `vmjob run` runs directly."""
    path = daemon.spool / "direct.yaml"
    data = yaml.safe_load(daemon.config.read_text())
    path.write_text(yaml.safe_dump({**data, "socket": str(daemon.spool / "nobody.sock")}))
    return path


def modes(daemon: Daemon, direct_config: Path) -> dict[str, list[str]]:
    vmjob = [sys.executable, "-m", "vmjobs"]
    return {
        "direct run": [*vmjob, "--config", str(direct_config), "run"],
        "run with a daemon": [*vmjob, "--config", str(daemon.config), "run"],
        "submit": [*vmjob, "--config", str(daemon.config), "submit"],
    }


def refused_everywhere(daemon: Daemon, direct_config: Path, args: list[str],
                       line: str) -> None:
    jobs_before = daemon.query("SELECT COUNT(*) FROM jobs")[0][0]
    for mode, command in modes(daemon, direct_config).items():
        result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"vmjob: {line}\n"), \
            mode
    assert daemon.query("SELECT COUNT(*) FROM jobs")[0][0] == jobs_before
    assert our_domains() == []


@pytest.mark.parametrize("args, line", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_a_bad_option_is_refused_alike_with_and_without_the_daemon(
        daemon: Daemon, direct_config: Path, args: list[str], line: str) -> None:
    refused_everywhere(daemon, direct_config, [*args, "--", "true"], line)


@pytest.mark.parametrize("fields, line", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_a_bad_job_file_is_refused_alike_and_the_api_says_the_same(
        daemon: Daemon, direct_config: Path, tmp_path: Path, fields: dict[str, Any],
        line: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"argv": ["true"], **fields}))
    refused_everywhere(daemon, direct_config, ["-f", str(job)], f"-f {job}: {line}")
    client = daemon.client()
    try:
        with pytest.raises(ApiFailure) as info:
            # NaN and Infinity as Python's json writes them
            client.submit(json.loads(json.dumps({"argv": ["true"], **fields})))
    finally:
        client.close()
    constant = next((c for c in ("NaN", "Infinity") if c in json.dumps(fields)), None)
    if constant is not None:  # the server refuses them as JSON already, before the spec
        assert (info.value.status, str(info.value)) == (
            400, f"request body is not JSON: {constant} is not a JSON number")
    else:
        assert (info.value.status, info.value.code, str(info.value)) == (400, "usage", line)


def test_a_nul_byte_in_the_command_is_refused_alike(daemon: Daemon, direct_config: Path,
                                                    tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text('argv: ["a\\0b"]\n')  # a NUL cannot be passed in a process's arguments
    refused_everywhere(daemon, direct_config, ["-f", str(job)], NUL_ARGV)
    client = daemon.client()
    try:
        with pytest.raises(ApiFailure) as info:
            client.submit({"argv": ["a\0b"]})
    finally:
        client.close()
    assert (info.value.status, str(info.value)) == (400, NUL_ARGV)


def test_labels_threads_and_hugepages_reach_the_engine_in_both_modes(
        daemon: Daemon, direct_config: Path) -> None:
    """The new options are asked of the placement engine, not dropped: a label no host
    carries, or 1G hugepages the test host has none of, never fit — in either mode."""
    for args, reason in ((["--label", "rack=r9"], "label rack=r9"),
                         (["--hugepages", "1G", "--mem", "1G"], "hugepage")):
        for mode, command in modes(daemon, direct_config).items():
            result = subprocess.run([*command, *args, "--", "true"], capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 1, (mode, result.stderr)
            assert result.stderr.count("\n") == 1 and reason in result.stderr, \
                (mode, result.stderr)
    assert our_domains() == []
