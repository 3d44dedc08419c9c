"""The body of `POST /v1/cancel` (pure: no daemon): what it selects, what it refuses."""

from __future__ import annotations

import pytest

from vmjobs.daemon.api import CancelQuery, cancel_query
from vmjobs.errors import UsageError
from vmjobs.jobs import JobState


def test_names_states_and_user() -> None:
    assert cancel_query({"jobs": ["a1", "b2_3"]}) == CancelQuery(("a1", "b2_3"))
    assert cancel_query({"states": ["queued", "RUNNING"], "user": "alice"}) == CancelQuery(
        (), frozenset({JobState.QUEUED, JobState.RUNNING}), "alice")


@pytest.mark.parametrize(("body", "problem"), [
    ({}, "name the jobs or arrays to cancel, or give a filter"),
    ({"states": ["DONE"]}, "unknown state 'DONE'"),
    ({"states": ["completed"]}, "state COMPLETED is an end"),
    ({"jobs": "a1"}, "jobs must be a list"),
    ({"jobs": [""]}, "jobs must be a list"),
    ({"jobs": ["x"] * 10_001}, "at most 10000"),
    ({"name": "sweep"}, r"unknown field\(s\) name"),
])
def test_bad_bodies_are_usage_errors(body: dict[str, object], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        cancel_query(body)
