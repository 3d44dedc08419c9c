"""`--output` that can never be made is refused before the job runs (vmjobs.spec.check_paths):
a new user's `vmjob run --output FILE/dir` ran the whole job, then failed to write its
results and exited 1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmjobs.spec import Spec, SpecError, check_paths, parse


def _spec(output: Path) -> Spec:
    return parse({"argv": ["true"], "output": str(output)})


def test_an_output_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "results.txt").write_text("x")
    with pytest.raises(SpecError) as refused:
        check_paths(_spec(tmp_path / "results.txt" / "run1" / "out"))
    assert str(refused.value) == (f"--output {tmp_path}/results.txt/run1/out: cannot be made: "
                                  f"{tmp_path}/results.txt is not a directory")


def test_an_output_that_can_be_made_or_exists_is_accepted(tmp_path: Path) -> None:
    check_paths(_spec(tmp_path / "a" / "b"))
    check_paths(_spec(tmp_path))
    assert not (tmp_path / "a").exists()  # nothing is made before the job


def test_an_output_in_a_directory_without_write_permission_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root may write anywhere, so the permission check is seen through os.access itself
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(SpecError, match=f"cannot be made: {tmp_path} is not writable"):
        check_paths(_spec(tmp_path / "new"))
