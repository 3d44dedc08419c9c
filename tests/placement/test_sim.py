"""The trace simulator: hand-checked EASY backfill, metrics, rejection, migrations, determinism."""

from __future__ import annotations

import csv
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement.model import NumaPolicy
from placement.sim import (
    POLICIES,
    SimConfig,
    SimResult,
    Status,
    jobs_from_trace,
    main,
    parse_mib,
    simulate,
)
from placement.swf import Trace, parse_swf

DATA = Path(__file__).resolve().parents[1] / "data"
GIB = 1024


def run(trace: Trace, config: SimConfig) -> SimResult:
    jobs, skipped = jobs_from_trace(trace, config)
    return simulate(jobs, config, skipped)


def shipped(name: str) -> Trace:
    with open(DATA / name, encoding="utf-8") as handle:
        return parse_swf(handle)


# easy-backfill.swf on 1 host x 2 nodes x 4 cores; its comments tell the story.
EASY = SimConfig(hosts=1, nodes_per_host=2, cores_per_node=4, mem_per_node_mib=16 * GIB)


@pytest.mark.parametrize("policy", POLICIES)
def test_easy_backfill_by_hand(policy: str) -> None:
    result = run(shipped("easy-backfill.swf"), replace(EASY, policy=policy))
    # Job 3 (8 cores) waits for jobs 1 and 2, which end at 100; job 4 ends by 70 and job 6 by
    # its estimate 100, so both backfill; job 5 would hold a core job 3 needs past 100.
    assert result.starts == (("j1", 0), ("j2", 0), ("j4", 20), ("j6", 40), ("j3", 100),
                             ("j5", 150))
    assert (result.jobs, result.rejected, result.skipped, result.migrations) == (6, 1, 2, 0)
    waits = [0, 0, 90, 0, 120, 0]  # jobs 1-6
    assert result.mean_wait_s == sum(waits) / 6 == 35.0
    assert result.p95_wait_s == 120.0  # nearest rank: the 6th of 6
    # max(1, (wait + run) / max(run, 10)): job 3 is (90 + 50) / 50, job 5 (120 + 500) / 500.
    assert result.bounded_slowdown == pytest.approx((1 + 1 + 2.8 + 1 + 1.24 + 1) / 6)
    # Busy core-seconds 4*100 + 1*100 + 8*50 + 2*50 + 1*500 + 1*30 over 8 cores x 0..650 s.
    assert result.utilization == pytest.approx(1530 / (8 * 650))
    # While job 3 heads the queue: 3 free cores over 10..20, 1 over 20..40, 3 over 70..100.
    assert result.stranded_cores == pytest.approx((3 * 10 + 1 * 20 + 3 * 30) / 650)


def test_a_job_bigger_than_any_host_is_rejected_not_queued() -> None:
    trace = parse_swf(["1 0 -1 100 2 -1 -1 2 100 -1 1 1 1 -1 -1 1 -1 -1",
                       "2 5 -1 100 9 -1 -1 9 100 -1 1 1 1 -1 -1 1 -1 -1",
                       "3 6 -1 100 2 -1 -1 2 100 -1 1 1 1 -1 -1 1 -1 -1"])
    result = run(trace, EASY)
    assert result.rejected == 1
    assert result.starts == (("j1", 0), ("j3", 6)), "a rejected job blocks nobody"


def test_too_much_memory_for_a_host_is_rejected_and_for_a_node_spans() -> None:
    # 2 processors x 10 GiB: over a 16 GiB node, within the 32 GiB host -> numa any.
    # 2 processors x 20 GiB: over the host -> never fits.
    trace = parse_swf([f"1 0 -1 10 2 -1 -1 2 10 {10 * GIB * GIB} 1 1 1 -1 -1 1 -1 -1",
                       f"2 0 -1 10 2 -1 -1 2 10 {20 * GIB * GIB} 1 1 1 -1 -1 1 -1 -1"])
    jobs, _ = jobs_from_trace(trace, EASY)
    assert [(j.request.memory_mib, j.request.numa) for j in jobs] == [
        (20 * GIB, NumaPolicy.ANY), (40 * GIB, NumaPolicy.ANY)]
    result = run(trace, EASY)
    assert (result.jobs, result.rejected) == (1, 1)


def test_requests_from_trace_jobs() -> None:
    jobs, skipped = jobs_from_trace(shipped("easy-backfill.swf"), EASY)
    assert [(o.job, o.submit, o.status) for o in skipped] == [
        ("j8", 50, Status.SKIPPED), ("j9", 55, Status.SKIPPED)]
    by_id = {j.id: j for j in jobs}
    # Unknown memory: 16 GiB / 4 cores = 4 GiB per processor.
    assert by_id["j1"].request.memory_mib == 16 * GIB
    assert by_id["j1"].request.numa == NumaPolicy.STRICT
    assert by_id["j3"].request.numa == NumaPolicy.ANY  # 8 cores: more than a node
    assert by_id["j2"].request.cpus == 1  # requested -1: the allocated count
    assert by_id["j4"].estimate == 50  # requested time -1: the run time
    assert by_id["j6"].estimate == 60


def test_repeated_job_numbers_get_distinct_ids() -> None:
    trace = parse_swf(["5 0 -1 10 1 -1 -1 1 10 -1 1 1 1 -1 -1 1 -1 -1"] * 3)
    jobs, _ = jobs_from_trace(trace, EASY)
    assert [j.id for j in jobs] == ["j5", "j5.1", "j5.2"]
    assert run(trace, EASY).jobs == 3


FRAG = SimConfig(hosts=2, nodes_per_host=1, cores_per_node=4, mem_per_node_mib=16 * GIB)


def test_pack_with_migration_makes_room_where_plain_queues_wait() -> None:
    trace = shipped("fragmenting.swf")
    plain = {p: run(trace, replace(FRAG, policy=p)) for p in ("firstfit", "pack")}
    moved = run(trace, replace(FRAG, policy="pack+migrate"))
    for result in plain.values():
        assert result.migrations == 0
        assert dict(result.starts)["j5"] == 1000
        assert result.stranded_cores == pytest.approx(4 * 980 / 1100)
    assert moved.migrations == 1
    assert dict(moved.starts)["j5"] == 20
    assert moved.mean_wait_s == 0.0 and moved.stranded_cores == 0.0


def synthetic_swf(seed: int, count: int = 150) -> list[str]:
    rng = random.Random(seed)
    lines = ["; synthetic, seeded"]
    submit = 0
    for n in range(1, count + 1):
        submit += rng.randrange(0, 400)
        run_s = rng.choice((5, 60, 600, 3000, 9000))
        procs = rng.choice((1, 2, 4, 4, 8, 8, 12, 16, 24, 32, 40))
        memory = rng.choice((-1, -1, 512 * 1024, 3 * 1024 * 1024))
        asked = rng.choice((-1, run_s, run_s * 2))
        lines.append(f"{n} {submit} -1 {run_s} {procs} -1 -1 {procs} {asked} {memory} "
                     f"1 1 1 -1 -1 1 -1 -1")
    return lines


SMALL = SimConfig(hosts=4, nodes_per_host=2, cores_per_node=8, mem_per_node_mib=32 * GIB)


@pytest.mark.parametrize("policy", POLICIES)
def test_same_trace_same_figures(policy: str) -> None:
    trace = parse_swf(synthetic_swf(7))
    config = replace(SMALL, policy=policy)
    first, second = run(trace, config), run(trace, config)
    assert first == second  # every field but the wall clock, the start order included
    assert first.rejected > 0 and first.jobs + first.rejected == 150


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(POLICIES))
def test_every_job_runs_once_after_its_submit(seed: int, policy: str) -> None:
    trace = parse_swf(synthetic_swf(seed, count=40))
    config = replace(SMALL, policy=policy)
    jobs, skipped = jobs_from_trace(trace, config)
    result = simulate(jobs, config, skipped)
    started = [job for job, _ in result.starts]
    assert len(started) == len(set(started)) == result.jobs
    assert result.jobs + result.rejected + result.skipped == len(trace.jobs)
    submits = {j.id: j.submit for j in jobs}
    assert all(at >= submits[job] for job, at in result.starts)
    assert 0.0 <= result.utilization <= 1.0
    assert result.bounded_slowdown >= 1.0 or result.jobs == 0
    assert 0.0 <= result.stranded_cores <= SMALL.hosts * 16
    if not policy.endswith("+migrate"):
        assert result.migrations == 0


def test_parse_mib() -> None:
    assert parse_mib("64G") == parse_mib("64GiB") == parse_mib("64gb") == 65536
    assert parse_mib("512M") == parse_mib("512") == 512
    assert parse_mib("1T") == 1024 * 1024


def test_command_line_prints_every_policy(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "easy-backfill.swf"
    assert main([str(path), "--hosts", "1", "--nodes-per-host", "2", "--cores-per-node", "4",
                 "--mem-per-node", "16G", "--policy", "all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{path}: 9 jobs (2 without size or run time, 2 malformed lines); "
                      "cluster 1 hosts x 2 nodes x 4 cores, 16384 MiB per node")
    assert out[1].split()[:4] == ["policy", "jobs", "rejected", "util"]
    assert [row.split()[0] for row in out[2:]] == list(POLICIES)
    assert out[2].split()[1:4] == ["6", "1", "29.4"]
    assert out[1].split()[-4:] == ["backfills", "migrations", "sim", "s"]
    assert out[2].split()[-3:-1] == ["2", "0"]  # j4 and j6 backfilled, nothing migrated


def test_jobs_csv_has_one_row_per_trace_job(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "jobs.csv"
    assert main([str(DATA / "easy-backfill.swf"), "--hosts", "1", "--nodes-per-host", "2",
                 "--cores-per-node", "4", "--mem-per-node", "16G", "--policy", "pack",
                 "--jobs-csv", str(out)]) == 0
    with open(out, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["job", "submit", "start", "end", "host", "cpus", "status"]
    # Ran and rejected jobs in submit order, then the skipped ones; the starts worked out in
    # test_easy_backfill_by_hand, each end = start + run time.
    assert [(r[0], r[1], r[2], r[3], r[6]) for r in rows[1:]] == [
        ("j1", "0", "0", "100", "ran"), ("j2", "0", "0", "100", "ran"),
        ("j3", "10", "100", "150", "ran"), ("j4", "20", "20", "70", "ran"),
        ("j5", "30", "150", "650", "ran"), ("j6", "40", "40", "70", "ran"),
        ("j7", "45", "", "", "rejected"),
        ("j8", "50", "", "", "skipped"), ("j9", "55", "", "", "skipped"),
    ]
    sizes = {"j1": 4, "j2": 1, "j3": 8, "j4": 2, "j5": 1, "j6": 1}
    ran = [r for r in rows[1:] if r[6] == "ran"]
    assert {r[4] for r in ran} == {"h0"}
    cpus = {r[0]: {int(c) for c in r[5].split()} for r in ran}
    assert {job: len(held) for job, held in cpus.items()} == sizes
    assert all(r[4] == r[5] == "" for r in rows[1:] if r[6] != "ran")
    # Jobs that overlap in time never share a cpu.
    for a in ran:
        for b in ran:
            if a[0] < b[0] and int(a[2]) < int(b[3]) and int(b[2]) < int(a[3]):
                assert not cpus[a[0]] & cpus[b[0]], (a, b)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, message", [
    (["--jobs-csv", "x.csv"], "--jobs-csv writes one policy's jobs: give --policy too"),
    (["--policy", "best"], "argument --policy: invalid choice"),
    (["--hosts", "0"], "argument --hosts: '0' is not a whole number of at least 1"),
    (["--cores-per-node", "x"], "argument --cores-per-node: 'x' is not a whole number"),
    (["--mem-per-node", "12Q"], "'12Q' is not a memory size like 64G"),
    (["--mem-per-node", "infG"], "'infG' is not a memory size like 64G"),
])
def test_bad_usage_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([str(DATA / "easy-backfill.swf"), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.csv").exists()


def test_a_file_that_is_not_swf_is_one_line_and_exit_2(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An XML file given as the trace: every line malformed, no job. Refused (exit 2), not
    replayed as an empty workload with a table of zeros and exit 0."""
    with pytest.raises(SystemExit) as exited:
        main([str(DATA / "caps-quirks.xml"), "--policy", "pack"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "is not an SWF trace: no job lines" in err
    assert "(first: line 1)" in err


def test_missing_trace_is_one_line_and_exit_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "absent.swf"), "--policy", "pack"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and "absent.swf" in err
