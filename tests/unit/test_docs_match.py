"""What a new user copies from the docs and `--help` does what it says (found by trying the
docs as written: these examples printed empty `$NIC0 $NIC1`, or named a column set or a
profile that is not the real one)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.clicommands import commands
from vmjobs import jobtable
from vmjobs.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _example_lines() -> list[tuple[str, str]]:
    """(where, line) for every line of the docs and of every command's --help."""
    lines = [(f"{path.name}:{n}", line) for path in DOCS
             for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines += [(f"vmjob {name} --help", line.strip()) for name, command in commands(cli)
              for line in (command.help or "").splitlines()]
    return lines


def test_a_job_inside_a_reservation_that_uses_its_nics_asks_for_them() -> None:
    # A job inside a reservation has its own shape (default: no NICs), so an example that
    # prints $NIC0 inside one without --nics or --profile prints nothing there.
    wrong = [f"{where}: {line}" for where, line in _example_lines()
             if re.search(r"vmjob (run|submit|shell) .*--reservation", line)
             and ("$NIC" in line or "NIC0" in line.split("#")[-1])
             and "--nics" not in line and "--profile" not in line]
    assert not wrong, "\n".join(wrong)


def test_the_user_guide_states_lists_default_columns() -> None:
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    stated = re.search(r"The default is `([a-z_,]+)`", guide)
    assert stated is not None
    assert tuple(stated.group(1).split(",")) == jobtable.DEFAULT_COLUMNS
    for column in jobtable.DEFAULT_COLUMNS:
        assert f"| `{column}` |" in guide or f"`{column}`," in guide, column


def test_help_examples_name_profiles_the_docs_define() -> None:
    # the docs' example config defines these; a --help example with another name fails
    # with "unknown profile" when copied
    defined = set(re.findall(r"^\s+([a-z0-9]+): \{", (ROOT / "docs" / "user-guide.md")
                             .read_text(), re.MULTILINE))
    assert "2nic" in defined
    used = {(where, name) for where, line in _example_lines() if where.startswith("vmjob ")
            for name in re.findall(r"--profile (\S+)", line) if not name.startswith(("$", "N"))}
    assert {name for _, name in used} <= defined, sorted(used)


def test_every_command_the_user_guide_says_takes_json_does() -> None:
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    stated = re.search(r"Every command but (.*?) takes `--json`", guide, re.DOTALL)
    assert stated is not None
    exempt = set(re.findall(r"`([a-z-]+)`", stated.group(1)))
    lacking = [name for name, command in commands(cli)
               if name.split()[0] not in exempt and command.params
               and not any("--json" in getattr(p, "opts", []) for p in command.params)]
    assert not lacking, f"no --json, yet the user guide says they take it: {lacking}"
