"""`vmjob list`'s filters and columns (vmjobs.jobtable), over job views as the API gives them."""

from __future__ import annotations

from typing import Any

import pytest

from vmjobs import jobtable
from vmjobs.errors import UsageError
from vmjobs.jobs import JobState

NOW = 1_000_000.0


def view(job_id: str, state: str = "RUNNING", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": job_id, "name": None, "owner": "alice", "state": state, "host": "h1",
        "created": NOW - 7200, "updated": NOW - 60, "started": NOW - 3600,
        "time_limit": None, "exit_code": None, "position": None, "line": None,
        "waiting_because": None,
        "message": None, "request": {"cpus": 2, "memory_mib": 512, "pool": None, "host": None},
    }
    base.update(fields)
    return base


def test_age_counts_from_the_end_once_a_job_has_ended() -> None:
    # submitted 2 h ago, ended 1 min ago: an ended job's age is how long ago it ended
    done = view("a", "COMPLETED", exit_code=0)
    assert jobtable.age_seconds(done, NOW) == 60
    assert jobtable.age_seconds(view("b", "RUNNING"), NOW) == 7200
    cells = dict(zip(jobtable.DEFAULT_COLUMNS, jobtable.rows([done], jobtable.DEFAULT_COLUMNS,
                                                             NOW, header=False)[0],
                     strict=True))
    assert cells["age"] == "60s"


def test_elapsed_is_running_time_to_the_end_or_now() -> None:
    assert jobtable.elapsed_seconds(view("a", "RUNNING"), NOW) == 3600
    assert jobtable.elapsed_seconds(view("a", "COMPLETED"), NOW) == 3600 - 60
    assert jobtable.elapsed_seconds(view("q", "QUEUED", started=None), NOW) is None
    table = jobtable.rows([view("a", "RUNNING", time_limit=9000.0),
                           view("q", "QUEUED", started=None, position=1)],
                          ("id", "elapsed", "time_limit", "pos"), NOW)
    assert table == [("JOB", "ELAPSED", "TIME_LIMIT", "POS"), ("a", "1:00:00", "2:30:00", "-"),
                     ("q", "-", "-", "1")]


def test_filters_and_within_or_across() -> None:
    views = [
        view("a", owner="alice", name="sweep-1"),
        view("b", owner="bob", name="sweep-2", host="h2"),
        view("c", "QUEUED", owner="alice", host=None, name="other",
             request={"cpus": 1, "memory_mib": 256, "pool": "ci", "host": "h2"}),
        view("d", "FAILED", owner="carol", exit_code=1),
    ]

    def ids(**kw: Any) -> list[str]:
        filters = jobtable.Filters(**kw)
        return [v["id"] for v in views if jobtable.matches(v, filters)]

    assert ids() == ["a", "b", "c", "d"]
    assert ids(users=frozenset({"alice", "carol"})) == ["a", "c", "d"]
    assert ids(states=jobtable.parse_states(["running,Queued"])) == ["a", "b", "c"]
    assert ids(hosts=frozenset({"h2"})) == ["b", "c"]  # c asks for h2 while it waits
    assert ids(pools=frozenset({"ci"})) == ["c"]
    assert ids(names=("sweep-*",)) == ["a", "b"]
    assert ids(names=("sweep-*",), users=frozenset({"bob"})) == ["b"]
    assert ids(names=("nothing",)) == []


def test_an_ended_state_filter_asks_for_ended_jobs() -> None:
    assert jobtable.Filters(states=jobtable.parse_states(["completed"])).wants_ended
    assert not jobtable.Filters(states=jobtable.parse_states(["running"])).wants_ended
    assert jobtable.parse_states(["running", "queued,failed"]) == {
        JobState.RUNNING, JobState.QUEUED, JobState.FAILED}


def test_unknown_state_and_column_are_usage_errors_naming_the_choices() -> None:
    with pytest.raises(UsageError, match=r"--state 'runing' is not a job state \(one of "
                                         r"QUEUED, PLACED"):
        jobtable.parse_states(["runing"])
    with pytest.raises(UsageError, match=r"-o: unknown column\(s\) 'size' \(columns: id, "):
        jobtable.parse_columns("id,size")


def test_columns_by_name_in_the_order_given() -> None:
    assert jobtable.parse_columns(None) == jobtable.DEFAULT_COLUMNS
    assert jobtable.parse_columns("state, ID,time-limit") == ("state", "id", "time_limit")
    lines = jobtable.render(jobtable.rows([view("3f9a1c2e", name="n")], ("id", "name", "state"),
                                          NOW, header=False))
    assert lines == ["3f9a1c2e  n  RUNNING"]
    assert jobtable.render([]) == []


def test_place_in_line_names_a_pool_other_than_the_default() -> None:
    assert jobtable.place_in_line(view("q", "QUEUED", position=3, line="ci")) == \
        "position 3 in pool ci"
    assert jobtable.place_in_line(view("q", "QUEUED", position=1, line="default")) == \
        "position 1"
    assert jobtable.place_in_line(view("q", "QUEUED")) == "position -"
