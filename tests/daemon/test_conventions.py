"""What a Slurm or kubectl user expects of the job commands (issue 11 part 6), against a real
daemon whose only host is cordoned: every job stays QUEUED, so no guest boots and the test
needs no guest lock.

Covered: job names, unique id prefixes on every job command and the refusal of an ambiguous
one (exit 2, candidates named, `code: ambiguous` with --json), `list` filters and columns,
`logs --tail`, `wait --timeout` (exit 3, the job goes on), ages of ended jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Any

import pytest

from tests.daemon.conftest import Daemon
from vmjobs import __version__
from vmjobs.outcome import EXIT_WAIT_EXPIRED

JOBS = 17  # 16 hex digits: 17 ids always share a first digit (pigeonhole), so a 1-character
# prefix is ambiguous for sure, whatever the random ids are


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    daemon = make_daemon("conventions")
    daemon.start()
    drained = daemon.vmjob("drain", "local", "--json")  # cordoned: nothing starts
    assert drained.returncode == 0, drained.stderr
    yield daemon
    daemon.stop()


def _submit(daemon: Daemon, *args: str) -> str:
    done = daemon.vmjob("submit", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _shortest_unique_prefix(job_id: str, others: list[str]) -> str:
    for length in range(1, len(job_id) + 1):
        if not any(o != job_id and o.startswith(job_id[:length]) for o in others):
            return job_id[:length]
    return job_id


def test_names_prefixes_filters_tail_and_wait_timeout(daemon: Daemon) -> None:
    ids = [_submit(daemon, "--name", f"sweep-{i}" if i % 2 else f"other-{i}", "--time-limit",
                   "1:30:00", "--", "true") for i in range(JOBS)]
    by_first: dict[str, list[str]] = defaultdict(list)
    for job_id in ids:
        by_first[job_id[0]].append(job_id)
    shared = next(group for group in by_first.values() if len(group) > 1)

    # an ambiguous prefix: one line naming candidates, exit 2, on every job command
    for command in (["show"], ["logs"], ["wait"], ["cancel"], ["checkpoint"], ["restore"],
                    ["migrate"]):
        refused = daemon.vmjob(*command, shared[0][0])
        assert refused.returncode == 2, (command, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert f"job id prefix '{shared[0][0]}' is ambiguous" in refused.stderr
        assert sorted(shared)[0] in refused.stderr
    as_json = daemon.vmjob("show", shared[0][0], "--json")
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["code"] == "ambiguous"

    # a unique prefix names the job everywhere
    job = ids[1]
    prefix = _shortest_unique_prefix(job, ids)
    shown = daemon.vmjob("show", prefix, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["id"], view["name"], view["state"]) == (job, "sweep-1", "QUEUED")
    text = daemon.vmjob("show", prefix)
    assert "name       sweep-1" in text.stdout and "time limit 1:30:00" in text.stdout
    tail = daemon.vmjob("logs", "--tail", "5", prefix)
    assert (tail.returncode, tail.stdout) == (0, "")  # a queued job printed nothing yet
    waited = daemon.vmjob("wait", prefix, "--timeout", "1s", "--json")
    assert waited.returncode == EXIT_WAIT_EXPIRED, waited.stderr
    assert json.loads(waited.stdout)["finished"] is False
    assert daemon.vmjob("wait", prefix, "--timeout", "1s").stderr == \
        f"vmjob: job {job} has not ended after 1s (QUEUED)\n"
    assert daemon.vmjob("show", "zz").returncode == 1  # no such job: not a usage error

    # refusals under --json (issue 11: migrate and submit --no-wait printed nothing)
    for args, code, error in [
        (("submit", "--no-wait", "--json", "--", "true"), 75, "not_started"),
        (("migrate", prefix, "--json"), 1, "error"),
        (("show", "zz", "--json"), 1, "not_found"),
        (("uncordon", "nowhere", "--json"), 1, "not_found"),
    ]:
        refused = daemon.vmjob(*args)
        assert refused.returncode == code, (args, refused.stderr)
        answer = json.loads(refused.stdout)
        assert (answer["code"], answer["exit_code"]) == (error, code), (args, answer)
        assert refused.stderr == f"vmjob: {answer['error']}\n"

    # list: filters and columns
    names = daemon.vmjob("list", "--name", "sweep-*", "-o", "id,name,state,time_limit",
                         "--no-header")
    assert names.returncode == 0, names.stderr
    rows = [line.split() for line in names.stdout.splitlines()]
    assert sorted(rows) == sorted([i, f"sweep-{n}", "QUEUED", "1:30:00"]
                                  for n, i in enumerate(ids) if n % 2)
    assert daemon.vmjob("list", "--state", "running", "--no-header").stdout == ""
    mine = json.loads(daemon.vmjob("list", "--user", "root", "--state", "queued",
                                   "--json").stdout)
    assert sorted(v["id"] for v in mine) == sorted(ids)
    assert json.loads(daemon.vmjob("list", "--user", "nobody", "--json").stdout) == []
    header = daemon.vmjob("list", "-o", "id,elapsed,age").stdout.splitlines()[0].split()
    assert header == ["JOB", "ELAPSED", "AGE"]

    # cancel through a prefix; the ended job is listed by an ended state, its age from its end
    cancelled = daemon.vmjob("cancel", prefix, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancelled"][0]["state"] == "CANCELLED"
    ended = daemon.vmjob("list", "--state", "cancelled", "-o", "id,state,elapsed",
                         "--no-header")
    assert ended.stdout.split() == [job, "CANCELLED", "-"]  # it never ran
    for job_id in ids:
        if job_id != job:
            assert daemon.vmjob("cancel", job_id).returncode == 0
    assert daemon.reservations() == 0


def test_hosts_and_version_ask_the_daemon_at_the_url(daemon: Daemon, tmp_path: Any) -> None:
    url = f"unix://{daemon.socket}"
    missing = str(tmp_path / "no-such-config.yaml")  # with a URL no config is read
    shown = subprocess.run([sys.executable, "-m", "vmjobs", "--config", missing, "hosts",
                            "--url", url, "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    (local,) = json.loads(shown.stdout)
    assert (local["name"], local["state"]) == ("local", "cordoned")  # the daemon's view
    table = subprocess.run([sys.executable, "-m", "vmjobs", "--config", missing, "hosts"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "VMJOBS_URL": url})
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].split()[:2] == ["local", "cordoned"]
    unknown = subprocess.run([sys.executable, "-m", "vmjobs", "hosts", "nowhere", "--url", url],
                             capture_output=True, text=True, timeout=60)
    assert (unknown.returncode, unknown.stderr) == (
        1, f"vmjob: unknown host 'nowhere' at {url}\n")

    version = subprocess.run([sys.executable, "-m", "vmjobs", "--version"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "VMJOBS_URL": url})
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines() == [f"vmjob, version {__version__}",
                                           f"daemon, version {__version__} ({daemon.socket})"]
    alone = subprocess.run([sys.executable, "-m", "vmjobs", "--version"], capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "VMJOBS_URL": f"unix://{tmp_path}/none.sock"})
    assert alone.stdout == f"vmjob, version {__version__}\n"  # no daemon: the client's only


def test_a_repeat_image_build_runs_no_apt_in_any_locale(image_root: Any, tmp_path: Any) -> None:
    """`vmjob image build` of an up-to-date image, with the user's locale German: succeeds,
    and the second time runs no apt command at all (watched through PATH wrappers)."""
    log = tmp_path / "apt-calls.log"
    log.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-cache", "apt-get", "apt"):
        real = shutil.which(name)
        assert real
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n'
                                    f'exec {real} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LANGUAGE": "de",
           "LANG": "de_DE.UTF-8"}
    command = [sys.executable, "-m", "vmjobs", "--config", str(image_root / "build.yaml"),
               "image", "build", "--json"]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["built"] is False
    log.write_text("")
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr
    assert log.read_text() == ""  # nothing to do: apt not run


def test_tail_and_times_of_a_job_that_ran(make_daemon: Any) -> None:
    """A real guest (run under the guest lock): `logs --tail`, and the ELAPSED/AGE of an
    ended job."""
    daemon = make_daemon("conventions-ran")
    daemon.start()
    try:
        job = _submit(daemon, "--name", "printer", "--",
                      "printf", "l1\\nl2\\nl3\\nl4\\nlast, no newline")
        waited = daemon.vmjob("wait", job[:6], timeout=300)
        assert waited.returncode == 0, waited.stderr + daemon.log_text()
        tails = {n: daemon.vmjob("logs", "--tail", str(n), job[:6]).stdout for n in (0, 1, 2, 9)}
        assert tails == {0: "", 1: "last, no newline", 2: "l4\nlast, no newline",
                         9: "l1\nl2\nl3\nl4\nlast, no newline"}
        assert daemon.vmjob("logs", "--tail", "2", "-f", job).stdout == \
            "l4\nlast, no newline"  # -f after the tail: nothing more, the job has ended
        as_json = daemon.vmjob("logs", "--tail", "1", "--json", job).stdout
        assert [json.loads(line) for line in as_json.splitlines()] == [
            {"output": "last, no newline"}]
        (row,) = [line.split() for line in daemon.vmjob(
            "list", "--all", "-n", "printer", "-o", "id,state,exit_code,elapsed,age",
            "--no-header").stdout.splitlines()]
        assert row[:3] == [job, "COMPLETED", "0"]
        minutes, seconds = row[3].split(":")  # it ran a few seconds: M:SS
        assert int(minutes) == 0 and 0 <= int(seconds) < 60
        assert row[4].endswith("s") and int(row[4][:-1]) < 120  # since its end, just now
    finally:
        daemon.stop()
