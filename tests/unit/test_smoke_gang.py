"""`vmjob smoke migrate --gang`: the pure parts (what counts as a member's view passing) and
the command line's refusals. The real run is tests/multihost/test_gang_example.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vmjobs.cli import cli
from vmjobs.smoke_gang import counter_problems, destinations, seen_ok, ticks_of

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "migration-smoke.yaml"


def test_ticks_are_read_from_whole_lines_only() -> None:
    text = "tick 0\ntick 1\nnode1 saw tick 7\ntick 2 extra\n\ntick 2\n"
    assert ticks_of(text) == [0, 1, 2]


def test_counter_problems_name_every_skip_and_repeat() -> None:
    assert counter_problems([0, 1, 2, 3]) == []
    assert counter_problems([]) == []
    assert counter_problems([0, 1, 1, 2, 4]) == ["tick 1 repeated",
                                                 "counter skipped from 2 to 4"]
    assert counter_problems([3, 4]) == ["the first tick seen is 3, not 0"]


@pytest.mark.parametrize(("value", "ok"), [
    ("12 16", True), ("12 12", False), ("16 12", False), ("FAILED 12 ", False),
    ("FAILED", False), ("", False), (None, False), ("1 2 3", False), ("a 2", False),
])
def test_what_node1_saw_passes_only_as_a_counter_that_went_on(value: str | None,
                                                              ok: bool) -> None:
    assert seen_ok(value) is ok


def test_destinations_alternate_when_given_and_are_left_to_the_daemon_otherwise() -> None:
    assert destinations(3, "h3", "h1") == ["h3", "h1", "h3"]
    assert destinations(2, None, "h1") == [None, None]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"spool: {tmp_path / 'spool'}\nsocket: {tmp_path / 'none.sock'}\n"
                    "hosts: [{name: local, uri: 'test:///default'}]\n")
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--gang", str(EXAMPLE), "--from", "h1"], "--from is not for --gang"),
    (["--to", "h2"], "give --from and --to (or --gang FILE)"),
    (["--gang", "/nonexistent.yaml"], "does not exist"),
    (["--gang", str(EXAMPLE), "--mem", "1G"], "--mem is not for --gang"),
])
def test_bad_smoke_options_are_one_line_exit_2(config: Path, args: list[str],
                                               message: str) -> None:
    result = CliRunner().invoke(cli, ["--config", str(config), "smoke", "migrate", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_job_file_that_is_no_gang_is_refused(config: Path, tmp_path: Path) -> None:
    single = tmp_path / "one.yaml"
    single.write_text('argv: ["true"]\n')
    result = CliRunner().invoke(cli, ["--config", str(config), "smoke", "migrate", "--gang",
                                      str(single)])
    assert result.exit_code == 2 and "at least 2 members" in result.output, result.output


def test_the_docs_example_is_a_valid_gang_of_two() -> None:
    from vmjobs.cli.options import spec_from_options

    spec = spec_from_options({}, EXAMPLE)
    assert spec.nodes is not None and len(spec.nodes) == 2
    assert [m.argv[:2] for m in spec.members()] == [("sh", "-c"), ("sh", "-c")]
