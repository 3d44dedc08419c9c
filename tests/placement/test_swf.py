"""Reading SWF: comments, blank lines, -1 fields, decimals and lines that are not jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement.swf import SwfJob, parse_swf

DATA = Path(__file__).resolve().parents[1] / "data"


def line(**given: float) -> str:
    """A job line with every field -1 except those given by SWF field name."""
    names = ("number", "submit", "wait", "run", "allocated", "cpu", "used_memory", "requested",
             "requested_time", "requested_memory", "status", "user", "group", "executable",
             "queue", "partition", "preceding", "think")
    unknown = set(given) - set(names)
    assert not unknown, unknown
    return " ".join(str(given.get(name, -1)) for name in names)


def test_a_job_line_reads_into_its_fields() -> None:
    trace = parse_swf([line(number=7, submit=30, wait=5, run=100, allocated=4, used_memory=2048,
                            requested=8, requested_time=3600, requested_memory=4096, status=1,
                            user=3)])
    assert trace.jobs == (SwfJob(number=7, submit=30, wait=5, run=100, allocated_procs=4,
                                 used_memory_kb=2048, requested_procs=8, requested_time=3600,
                                 requested_memory_kb=4096, status=1, user=3),)
    assert trace.malformed == () and trace.header == ()


def test_comments_become_the_header_and_blank_lines_are_skipped() -> None:
    trace = parse_swf(["; Version: 2.2\n", "  ;MaxProcs: 240\n", "\n", "   \n",
                       line(number=1, run=5, requested=1) + "\n"])
    assert trace.header == ("Version: 2.2", "MaxProcs: 240")
    assert [j.number for j in trace.jobs] == [1]
    assert trace.malformed == ()


def test_unknown_size_and_memory_fall_back_to_what_is_known() -> None:
    allocated_only = parse_swf([line(number=1, allocated=6, used_memory=512)]).jobs[0]
    assert allocated_only.procs == 6
    assert allocated_only.memory_kb_per_proc == 512
    requested = parse_swf([line(number=2, allocated=6, requested=8, used_memory=512,
                                requested_memory=1024)]).jobs[0]
    assert requested.procs == 8
    assert requested.memory_kb_per_proc == 1024
    nothing = parse_swf([line(number=3)]).jobs[0]
    assert nothing.procs == -1 and nothing.memory_kb_per_proc == -1


def test_decimal_fields_are_truncated_to_whole_numbers() -> None:
    job = parse_swf([line(number=12, run=553, cpu=552.21, requested=40)]).jobs[0]
    assert job.run == 553
    assert parse_swf(["1 0 -1 10.9 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1 -1"]).jobs[0].run == 10


@pytest.mark.parametrize("bad", [
    "1 0 -1 10 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1",  # 17 fields
    "1 0 -1 10 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1 -1 7",  # 19 fields
    "1 0 -1 ten 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1 -1",
    "1 0 -1 inf 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1 -1",
    "1 0 -1 nan 1 -1 -1 1 -1 -1 1 1 1 -1 -1 1 -1 -1",
    "# not the comment character of SWF",
])
def test_malformed_lines_are_counted_not_guessed(bad: str) -> None:
    trace = parse_swf(["; header", line(number=1, run=1, requested=1), bad])
    assert [j.number for j in trace.jobs] == [1]
    assert trace.malformed == (3,)


def test_the_shipped_trace() -> None:
    with open(DATA / "easy-backfill.swf", encoding="utf-8") as handle:
        trace = parse_swf(handle)
    assert [j.number for j in trace.jobs] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert trace.header[0] == "Version: 2.2"
    assert len(trace.malformed) == 2  # a sentence and a line of 5 fields
    assert trace.jobs[1].requested_procs == -1 and trace.jobs[1].procs == 1
    assert trace.jobs[3].requested_time == -1
