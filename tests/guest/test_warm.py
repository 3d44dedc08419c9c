"""Warm start with real guests (TCG): `start: warm` restores each job from a template of its
image and shape (vmjobs/template.py). Few boots: one template, three restores, one rebuild."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.guest.conftest import Env, our_domains, write_config
from vmjobs.image import resolve_image
from vmjobs.jobs import JobState
from vmjobs.store import Store

# What the job prints: a first line, its clock, 16 bytes of /dev/urandom, the input it was given.
JOB = ("echo first; date +%s; head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
       " cat given.txt; echo \"env=$GREETING\"; exit 3")


@pytest.fixture(scope="module")
def warm_env(guest_env: Env, tmp_path_factory: pytest.TempPathFactory) -> Env:
    config = write_config(tmp_path_factory.mktemp("warm") / "config.yaml", guest_env.spool,
                          start="warm")
    return Env(config, guest_env.spool)


def run_warm(env: Env, inp: Path) -> tuple[list[str], str, tuple[float, float], str]:
    """(output lines, stderr, the host's clock before and after, job id) of one warm run."""
    before = time.time()
    result = env.vmjob("run", "--cpus", "1", "--mem", "256M", "--input", str(inp),
                       "--env", "GREETING=hello", "--", "sh", "-c", JOB, timeout=300)
    after = time.time()
    assert result.returncode == 3, result.stderr
    job_id = re.search(r"job (\S+) on local", result.stderr)
    assert job_id, result.stderr
    return result.stdout.splitlines(), result.stderr, (before, after), job_id.group(1)


def start_reason(env: Env, job_id: str) -> str:
    store = Store(env.spool / "state.db")
    try:
        return next(e.reason or "" for e in store.events(job_id) if e.state == JobState.STARTING)
    finally:
        store.close()


def templates(env: Env) -> list[Path]:
    """The records of this image's templates for the jobs here (1 vCPU, 256 MiB); the spool
    may hold others (other images, other shapes)."""
    image_id = resolve_image(env.spool, "default").id
    found = []
    for meta in sorted((env.spool / "templates").glob("*.json")):
        inputs = json.loads(meta.read_text())["inputs"]
        if (inputs["vcpus"], inputs["memory_mib"]) == (1, 256) and inputs["image"] in \
                (image_id, "0000000000000000"):
            found.append(meta)
    return found


def test_warm_jobs_get_their_output_exit_code_clock_input_and_own_random_state(
        warm_env: Env, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "given.txt").write_text("from the host\n")
    runs = [run_warm(warm_env, inp) for _ in range(2)]
    randoms = []
    for lines, _err, (before, after), job_id in runs:
        assert lines[0] == "first"
        # the guest's clock is the host's (the template's stopped when it was saved, before
        # this run began); `date +%s` truncates, hence the second of slack
        assert before - 1 <= int(lines[1]) <= after, (lines[1], before, after)
        assert re.fullmatch(r"[0-9a-f]{32}", lines[2]), lines
        randoms.append(lines[2])
        assert lines[3:] == ["from the host", "env=hello"]
        assert start_reason(warm_env, job_id) == "starting (qemu, warm)"
    # two guests restored from one template: without the reseed their CRNG keys are the same
    assert randoms[0] != randoms[1]
    assert len(templates(warm_env)) == 1
    assert "making warm-start template" not in runs[1][1]  # the second used the first's
    assert not our_domains()


def test_a_stale_template_is_rebuilt_not_used(warm_env: Env, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "given.txt").write_text("from the host\n")
    run_warm(warm_env, inp)  # the template exists (made now or by the test before)
    [meta] = templates(warm_env)
    recorded = json.loads(meta.read_text())
    image_id = recorded["inputs"]["image"]
    recorded["inputs"]["image"] = "0000000000000000"  # as if made from another image
    meta.write_text(json.dumps(recorded))
    made_before = recorded["created"]
    lines, err, _now, job_id = run_warm(warm_env, inp)
    assert "it was made for a different image" in err, err
    assert lines[0] == "first" and lines[3:] == ["from the host", "env=hello"]
    assert start_reason(warm_env, job_id) == "starting (qemu, warm)"
    rebuilt = json.loads(meta.read_text())
    assert rebuilt["inputs"]["image"] == image_id
    assert rebuilt["created"] > made_before
    assert not our_domains()
