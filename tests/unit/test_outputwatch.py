"""outputwatch: a follower wakes on new output or wake(), not on a poll.

The safety timeouts given are long (60 s); each wait must end long before them, so only the
event can have ended it: the bounds are generous, the behaviour is not timing-sensitive."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from vmjobs.outputwatch import OutputWatch, filesystem_type, is_remote

LONG_S = 60.0


def later(action, delay_s: float = 0.3) -> threading.Thread:  # type: ignore[no-untyped-def]
    thread = threading.Timer(delay_s, action)
    thread.start()
    return thread


def test_a_write_to_an_output_file_wakes_the_waiter(tmp_path: Path) -> None:
    out = tmp_path / "output.0.out"
    out.touch()
    with OutputWatch(tmp_path) as watch:
        def write() -> None:
            with out.open("ab") as handle:
                handle.write(b"hello\n")
        later(write)
        started = time.monotonic()
        assert watch.wait(LONG_S)
        assert time.monotonic() - started < LONG_S / 2
        assert out.read_bytes() == b"hello\n"


def test_a_new_output_file_wakes_the_waiter(tmp_path: Path) -> None:
    with OutputWatch(tmp_path) as watch:
        later(lambda: (tmp_path / "output.1.out").touch())
        started = time.monotonic()
        assert watch.wait(LONG_S)
        assert time.monotonic() - started < LONG_S / 2


def test_wake_from_another_thread_and_before_the_wait(tmp_path: Path) -> None:
    with OutputWatch(tmp_path) as watch:
        later(watch.wake)
        started = time.monotonic()
        assert watch.wait(LONG_S)
        assert time.monotonic() - started < LONG_S / 2
        watch.wake()  # level-triggered: a wake before the wait is not lost
        assert watch.wait(LONG_S)
        assert not watch.wait(0.05)  # and it is consumed


def test_other_files_do_not_count_and_the_timeout_is_kept(tmp_path: Path) -> None:
    with OutputWatch(tmp_path) as watch:
        (tmp_path / "console.local.log").write_text("kernel messages\n")
        assert not watch.wait(0.2)


def test_a_directory_made_later_is_watched_once_it_exists(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "j1"
    with OutputWatch(job_dir) as watch:
        assert not watch.wait(0.05)  # nothing to watch yet: only the timeout
        job_dir.mkdir(parents=True)
        assert not watch.wait(0.05)  # armed now
        later(lambda: (job_dir / "output.0.out").write_bytes(b"x"))
        assert watch.wait(LONG_S)


def test_wake_after_close_is_harmless(tmp_path: Path) -> None:
    watch = OutputWatch(tmp_path)
    watch.close()
    watch.wake()
    watch.close()


def test_filesystem_type_of_known_mounts() -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) != ""
    assert not is_remote(Path("/proc"))
