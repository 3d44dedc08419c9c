"""When a running job's output must stop it (`guest.OutputGuard`): past `output_limit`, at
most one look per OUTPUT_CHECK_S. The full-spool half needs a real full file system:
tests/daemon/test_full_spool.py."""

from __future__ import annotations

from pathlib import Path

from vmjobs.guest import OUTPUT_CHECK_S, JobFiles, OutputGuard, output_size


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_counts_every_output_file_and_is_looked_at_once_per_interval(
        tmp_path: Path) -> None:
    files, clock = JobFiles(tmp_path), Clock()
    files.new_output()
    watch = OutputGuard(files, 1000, clock)
    files.output(0).write_bytes(b"x" * 600)
    clock.now += OUTPUT_CHECK_S
    assert watch.check() is None
    files.new_output()  # a migration: the destination's QEMU writes the next file
    files.output(1).write_bytes(b"y" * 401)
    assert output_size(files) == 1001
    clock.now += OUTPUT_CHECK_S / 2
    assert watch.check() is None  # not yet time to look again
    clock.now += OUTPUT_CHECK_S / 2
    assert watch.check() == "output exceeded output_limit 1000 bytes; guest stopped"


def test_exactly_the_limit_is_allowed_and_none_is_unlimited(tmp_path: Path) -> None:
    files, clock = JobFiles(tmp_path), Clock()
    files.new_output()
    files.output(0).write_bytes(b"x" * (1 << 20))
    clock.now += OUTPUT_CHECK_S
    assert OutputGuard(files, 1 << 20, clock).check() is None
    unlimited = OutputGuard(files, None, clock)
    files.output(0).write_bytes(b"x" * (3 << 20))
    clock.now += OUTPUT_CHECK_S
    assert unlimited.check() is None
    limited = OutputGuard(files, 1 << 20, clock)
    clock.now += OUTPUT_CHECK_S
    assert limited.check() == "output exceeded output_limit 1 MiB; guest stopped"


def test_output_that_stops_growing_on_a_spool_with_room_is_fine(tmp_path: Path) -> None:
    files, clock = JobFiles(tmp_path), Clock()
    files.new_output()
    watch = OutputGuard(files, None, clock)
    for _ in range(3):  # a quiet job: its output unchanged, the disk has room
        clock.now += OUTPUT_CHECK_S
        assert watch.check() is None
