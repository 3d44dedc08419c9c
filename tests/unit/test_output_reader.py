"""A job's output files (one per guest process: launch, migration, restore) read in order,
live and after the end; a reader that reconnects goes on from where it was."""

from __future__ import annotations

import stat
from pathlib import Path

from vmjobs.guest import JobFiles, OutputReader


def read_all(reader: OutputReader, final: bool, limit: int = 3) -> bytes:
    data = b""
    while chunk := reader.read(final=final, limit=limit):
        data += chunk
    return data


def test_new_output_makes_the_fifo_and_the_file_qemu_opens(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    assert files.new_output() == tmp_path / "output.0"
    assert files.new_output() == tmp_path / "output.1"
    assert stat.S_ISFIFO((tmp_path / "output.0.in").stat().st_mode)
    assert (tmp_path / "output.1.out").read_bytes() == b""
    assert files.output_indexes() == [0, 1]


def test_files_are_read_in_order_and_a_file_ends_once_a_later_one_has_data(
        tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    files.new_output()
    files.output(0).write_bytes(b"first ")
    reader = OutputReader(files)
    assert read_all(reader, final=False) == b"first "
    files.new_output()  # a migration began: the source may still write to file 0
    assert reader.read() == b""
    files.output(0).write_bytes(b"first more ")
    assert read_all(reader, final=False) == b"more "
    files.new_output()  # that migration failed (file 1 stays empty), a second one worked
    files.output(2).write_bytes(b"after")
    assert read_all(reader, final=False) == b"after"
    assert reader.total == len(b"first more after")


def test_when_the_guest_is_gone_every_file_is_read_to_its_end(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    for text in (b"a\xe2\x82", b"", b"\xacb"):  # a character split across two files
        files.output(int(files.new_output().name.split(".")[1])).write_bytes(text)
    assert read_all(OutputReader(files), final=True).decode() == "a€b"


def test_skip_goes_on_from_a_byte_count_across_files(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    for text in (b"0123", b"", b"4567"):
        files.output(int(files.new_output().name.split(".")[1])).write_bytes(text)
    for count in range(0, 10):
        reader = OutputReader(files)
        reader.skip(count)
        assert read_all(reader, final=True) == b"01234567"[count:]
