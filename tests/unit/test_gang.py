"""Gangs (`vmjobs.gang`, the spec's `nodes`): member ids, the stored spec, the guest's
variables, the gang's state and exit-code rule, the store query, and refusals of bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement import Request
from vmjobs import gang
from vmjobs.gang import Member
from vmjobs.jobs import JobRecord, JobState
from vmjobs.spec import SpecError, parse
from vmjobs.store import Store


def member(index: int, state: JobState, code: int | None = None,
           stopped_by: str | None = None) -> Member:
    return Member(index, f"g.{index}", "h1", state, code, None, stopped_by)


def test_member_ids() -> None:
    assert gang.member_id("3f9a1c2e", 4) == "3f9a1c2e.4"
    assert gang.split_member_id("3f9a1c2e.4") == ("3f9a1c2e", 4)
    assert gang.split_member_id("3f9a1c2e") is None
    assert gang.split_member_id("3f9a1c2e.x") is None


def test_stored_spec_and_guest_variables() -> None:
    stored = gang.member_spec({"argv": ["true"]}, "g", 1, 3, "continue")
    ref = gang.gang_of(stored)
    assert ref == gang.GangRef("g", 1, 3, "continue")
    assert gang.gang_env(stored) == {"VMJOB_NODE": "1", "VMJOB_NODES": "3"}
    assert gang.gang_of({"argv": ["true"]}) is None
    assert gang.gang_env({"argv": ["true"]}) == {}


def test_exit_code_is_the_first_failed_members() -> None:
    done = gang.outcome([member(0, JobState.COMPLETED, 0), member(1, JobState.COMPLETED, 0)])
    assert (done.state, done.finished, done.exit_code, done.failed) == (
        JobState.COMPLETED, True, 0, None)
    # member 1 failed first (by time), member 0 after it: 1's code
    both = gang.outcome([member(0, JobState.FAILED, 2), member(1, JobState.FAILED, 7)],
                        {"g.0": 20.0, "g.1": 10.0})
    assert (both.exit_code, both.failed and both.failed.job_id) == (7, "g.1")
    # a member the gang stopped because of another does not count
    stopped = gang.outcome([member(0, JobState.CANCELLED, None, stopped_by="g.1"),
                            member(1, JobState.FAILED, 1)], {"g.0": 1.0, "g.1": 5.0})
    assert (stopped.state, stopped.exit_code) == (JobState.FAILED, 1)
    assert stopped.message == "member g.1 FAILED (exit 1)"
    # a time limit: no exit code, the state says it (124 at the client)
    timed = gang.outcome([member(0, JobState.TIMEOUT), member(1, JobState.COMPLETED, 0)])
    assert (timed.state, timed.exit_code) == (JobState.TIMEOUT, None)


def test_unfinished_gang_reads_as_its_most_advanced_member() -> None:
    running = gang.outcome([member(0, JobState.RUNNING), member(1, JobState.STARTING)])
    assert (running.state, running.finished, running.exit_code) == (JobState.RUNNING, False,
                                                                    None)
    queued = gang.outcome([member(0, JobState.QUEUED), member(1, JobState.QUEUED)])
    assert queued.state == JobState.QUEUED
    # one ended, one runs: not finished
    assert not gang.outcome([member(0, JobState.COMPLETED, 0),
                             member(1, JobState.RUNNING)]).finished


def test_failure_is_a_nonzero_exit_or_an_end_without_one() -> None:
    assert not gang.is_failure(JobState.COMPLETED, 0)
    assert gang.is_failure(JobState.FAILED, 1)
    assert gang.is_failure(JobState.LOST, None)
    assert gang.is_failure(JobState.TIMEOUT, None)


def test_members_query_reads_only_the_gangs_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        request = Request(cpus=1, memory_mib=256)
        for job_id, spec in [
            ("g.1", gang.member_spec({"argv": ["b"]}, "g", 1, 2, "stop")),
            ("g.0", gang.member_spec({"argv": ["a"]}, "g", 0, 2, "stop")),
            ("g0", {"argv": ["other"]}),  # shares the prefix, no gang
            ("gx.0", gang.member_spec({"argv": ["c"]}, "gx", 0, 1, "stop")),
        ]:
            store.submit(JobRecord(job_id, "alice", 1000, JobState.QUEUED, spec), request,
                         "test")
        found = gang.members(store, "g")
        assert [(m.index, m.job_id, m.state) for m in found] == [
            (0, "g.0", JobState.QUEUED), (1, "g.1", JobState.QUEUED)]
        assert gang.members(store, "nope") == []
    finally:
        store.close()


def test_spec_nodes_round_trip_and_members() -> None:
    spec = parse({"argv": ["true"], "nodes": 3, "mem": "128M"})
    assert spec.host_limit() == 1
    assert [m.argv for m in spec.members()] == [("true",)] * 3
    assert all(m.nodes is None and m.mem == 128 for m in spec.members())
    assert parse(spec.to_dict()) == spec
    shaped = parse({"nodes": [{"name": "srv", "cmd": ["server"], "cpus": 2},
                              {"cmd": ["client"], "host": "h2"}],
                    "nodes_apart": False, "on_member_failure": "continue"})
    assert shaped.host_limit() is None
    assert [(m.name, m.argv, m.cpus, m.host) for m in shaped.members()] == [
        ("srv", ("server",), 2, None), (None, ("client",), 1, "h2")]
    assert parse(shaped.to_dict()) == shaped
    assert "nodes" not in parse({"argv": ["true"]}).to_dict()  # a job of no gang


@pytest.mark.parametrize("data, message", [
    ({"argv": ["x"], "nodes": 0}, "nodes must be an integer from 1 to 256, not 0"),
    ({"argv": ["x"], "nodes": [{"foo": 1}]}, "nodes[0]: unknown field(s) foo"),
    ({"argv": ["x"], "nodes": [{"cmd": "echo hi"}]}, "nodes[0]: cmd must be a non-empty list"),
    ({"argv": ["x"], "nodes": [{"mem": "1M"}]}, "nodes[0]: mem 1M is too small"),
    ({"argv": ["x"], "nodes": [{"host": "h1"}, {"host": "h1"}]},
     "nodes: 2 members name host h1, but at most 1 may share a host"),
    ({"argv": ["x"], "per_host": 2}, "--per-host is for gangs"),
    ({"argv": ["x"], "nodes": 2, "nodes_apart": False, "per_host": 2},
     "--per-host limits members per host when they are apart"),
    ({"argv": ["x"], "nodes": 2, "array": "1-3"}, "--nodes cannot be given with --array"),
    ({"argv": ["x"], "nodes": 2, "on_member_failure": "maybe"},
     "on_member_failure must be one of stop, continue"),
    ({"argv": ["x"], "env": {"VMJOB_NODE": "1"}}, "VMJOB_NODE is set by vmjob"),
])
def test_bad_gang_specs_are_one_line(data: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --- the command line: refusals before anything exists ----------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"spool: {tmp_path / 'spool'}\nsocket: {tmp_path / 'none.sock'}\n"
                    "hosts: [{name: h1, uri: 'test:///default'}]\n")
    return path


@pytest.mark.parametrize("args, line", [
    (["submit", "--nodes", "0", "--", "true"], "--nodes must be an integer from 1 to 256"),
    (["submit", "--nodes", "2", "--nodes-apart", "--nodes-together", "--", "true"],
     "give either --nodes-apart or --nodes-together, not both"),
    (["submit", "--per-host", "2", "--", "true"], "--per-host is for gangs"),
    (["run", "--nodes", "2", "--on-member-failure", "never", "--", "true"],
     "--on-member-failure must be one of stop, continue"),
    (["run", "--nodes", "2", "--", "true"], "--nodes needs the daemon"),
])
def test_bad_gang_options_are_one_line_exit_2(config: Path, tmp_path: Path, args: list[str],
                                              line: str) -> None:
    from click.testing import CliRunner

    from vmjobs.cli import cli

    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("vmjob: ") and result.stderr.count("\n") == 1
    assert line in result.stderr
    assert not (tmp_path / "spool" / "jobs").exists() or \
        not any((tmp_path / "spool" / "jobs").iterdir())  # nothing left behind
