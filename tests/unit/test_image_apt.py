"""The image build's use of apt (vmjobs.image), watched through PATH: wrapper scripts named
apt-cache and apt-get record every call (its arguments and locale), then run the real tool.

Real apt, real package lists: this machine's (Debian, as CI). Nothing is downloaded."""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

import pytest

from vmjobs import image

WRAPPED = ("apt-cache", "apt-get", "apt")


@pytest.fixture
def apt_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A log file that gets one line per apt command run: `NAME ARGS|LC_ALL|LANGUAGE`."""
    log = tmp_path / "apt-calls.log"
    log.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in WRAPPED:
        real = shutil.which(name)
        assert real, f"{name} is not installed (the image build needs apt)"
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nprintf "%s|%s|%s\\n" "{name} $*" "${{LC_ALL-unset}}" '
                           f'"${{LANGUAGE-unset}}" >> {log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_apt_is_asked_in_the_c_locale_whatever_the_users(
        apt_calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LANGUAGE=de translates apt-cache policy's "Candidate:" even under LC_ALL=C.UTF-8
    monkeypatch.setenv("LANGUAGE", "de")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    busybox, kernel = image.resolve_debs(with_kernel=True)
    assert busybox.package == image.BUSYBOX_PACKAGE and len(busybox.sha256) == 64
    assert kernel is not None and kernel.package.startswith("linux-image-")
    calls = _calls(apt_calls)
    assert calls and all(c.endswith("|C.UTF-8|") for c in calls), calls


def test_a_repeat_resolution_runs_no_apt_until_apt_state_changes(
        apt_calls: Path, tmp_path: Path) -> None:
    state = tmp_path / "apt-state"  # stands for apt's lists: what `apt-get update` rewrites
    state.mkdir()
    (state / "Packages").write_text("one\n")
    fingerprint = functools.partial(image.apt_fingerprint, (state,))
    spool = tmp_path / "spool"

    first = image.resolve_debs_cached(spool, True, fingerprint)
    assert [c.split()[0] for c in _calls(apt_calls)] == ["apt-cache"] * 3  # policy, show, show
    again = image.resolve_debs_cached(spool, True, fingerprint)
    assert again == first
    assert len(_calls(apt_calls)) == 3  # nothing new: apt was not run at all
    assert image.resolve_debs_cached(spool, False, fingerprint)[0] == first[0]
    assert len(_calls(apt_calls)) == 5  # the other question (busybox only) is asked once
    image.resolve_debs_cached(spool, False, fingerprint)
    image.resolve_debs_cached(spool, True, fingerprint)
    assert len(_calls(apt_calls)) == 5

    # apt-get update (a list rewritten): asked again
    (state / "Packages").write_text("two lines\n")
    os.utime(state / "Packages", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert image.resolve_debs_cached(spool, True, fingerprint) == first
    assert len(_calls(apt_calls)) == 8


def test_the_fingerprint_follows_name_size_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    lists = tmp_path / "lists" / "Packages"
    lists.write_text("a")
    roots = (tmp_path / "lists",)
    before = image.apt_fingerprint(roots)
    assert image.apt_fingerprint(roots) == before
    os.utime(lists, ns=(0, 10**9))
    touched = image.apt_fingerprint(roots)
    assert touched != before
    (tmp_path / "lists" / "Release").write_text("")
    assert image.apt_fingerprint(roots) != touched
    assert image.apt_fingerprint((tmp_path / "nothing-here",)) == image.apt_fingerprint(())
