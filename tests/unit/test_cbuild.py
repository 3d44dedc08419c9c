"""The guest helpers built static on this machine (vmjobs.cbuild), and vmjob-resume's own
refusals of bad input (its ioctls need a guest: tests/guest/test_warm.py)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmjobs.cbuild import build_static, source_digest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler here")


def test_a_helper_is_built_once_per_source(tmp_path: Path) -> None:
    built = build_static("vmjob-resume.c", tmp_path, "a test", "-Os")
    assert built.name == f"vmjob-resume-{source_digest('vmjob-resume.c')}"
    assert built.stat().st_mode & 0o777 == 0o755
    stamp = built.stat().st_mtime_ns
    assert build_static("vmjob-resume.c", tmp_path, "a test", "-Os") == built
    assert built.stat().st_mtime_ns == stamp  # found, not built again
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, stdin, message", [
    ([], b"", "usage"),
    (["1", "1000000000"], b"0" * 128, "usage"),  # nanoseconds out of range
    (["x", "0"], b"0" * 128, "usage"),
    (["NOW", "0"], b"0" * 100, "shorter than 128"),
    (["NOW", "0"], b"Z" * 128, "not lowercase hex"),
])
def test_vmjob_resume_refuses_bad_input_before_touching_the_clock(
        tmp_path: Path, args: list[str], stdin: bytes, message: str) -> None:
    helper = build_static("vmjob-resume.c", tmp_path, "a test", "-Os")
    # valid times are the host's own: a broken parser would at worst set the clock to now
    args = [str(int(time.time())) if a == "NOW" else a for a in args]
    done = subprocess.run([str(helper), *args], input=stdin, capture_output=True, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr.decode()


def test_builders_in_one_process_never_share_a_staging_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two launch threads of the daemon building the same helper at once (a gang's members
    starting together): each stages its own file, so neither rename finds its file gone.
    The copy waits for the other builder, so both are in that window together."""
    import threading

    import vmjobs.cbuild

    both = threading.Barrier(2, timeout=30)
    copy = shutil.copyfile

    def copy_then_meet(src: object, dst: object) -> object:
        done = copy(src, dst)
        both.wait()
        return done

    monkeypatch.setattr(vmjobs.cbuild.shutil, "copyfile", copy_then_meet)
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_static("vmjob-resume.c", tmp_path, "a test", "-Os"))
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(set(results)) == 1 and results[0].exists()
    assert not list(tmp_path.glob(".*.tmp"))
