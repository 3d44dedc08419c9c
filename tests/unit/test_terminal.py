"""The client's end of an interactive job (vmjobs/terminal.py) on a real pseudo-terminal pair:
raw mode on and off, the window size first, keys as data frames, the detach key, end of
file."""

from __future__ import annotations

import fcntl
import os
import pty
import queue
import struct
import termios
from collections.abc import Iterator

import pytest

from vmjobs.console import Data, End, FrameReader, Resize
from vmjobs.terminal import TerminalInput


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 97, 0, 0))
    yield master, slave
    os.close(master)
    os.close(slave)


def collector() -> tuple[queue.Queue, object]:
    got: queue.Queue = queue.Queue()
    reader = FrameReader()

    def send(frames: list[bytes]) -> bool:
        for frame in frames:
            for parsed in reader.feed(frame):
                got.put(parsed)
        return True

    return got, send


def canonical(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[3] & termios.ICANON)


def test_raw_mode_size_keys_and_restore(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    got, send = collector()
    with TerminalInput(tty_job=True, fd=slave) as term:
        assert canonical(slave)
        term.start(send)
        assert not canonical(slave)  # raw: each key goes as typed, Ctrl+C included
        assert got.get(timeout=5) == Resize(31, 97)
        os.write(master, b"ls\x03")
        data = b""
        while data != b"ls\x03":
            frame = got.get(timeout=5)
            assert isinstance(frame, Data)
            data += frame.data
        term.stop()
        assert canonical(slave)
    assert canonical(slave)


def test_detach_key_sends_what_came_before_it(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    got, send = collector()
    detached = []
    with TerminalInput(tty_job=True, fd=slave, detach_key=b"\x1d",
                       on_detach=lambda: detached.append(True)) as term:
        term.start(send)
        assert got.get(timeout=5) == Resize(31, 97)
        os.write(master, b"ab\x1dcd")
        assert got.get(timeout=5) == Data(b"ab")
        assert term.detached.wait(5) and detached == [True]
    assert got.empty()


def test_end_of_file_is_sent_as_end() -> None:
    read_end, write_end = os.pipe()
    got, send = collector()
    with TerminalInput(tty_job=False, fd=read_end) as term:
        term.start(send)
        os.write(write_end, b"x\n")
        os.close(write_end)
        assert got.get(timeout=5) == Data(b"x\n")
        assert got.get(timeout=5) == End()
    os.close(read_end)
