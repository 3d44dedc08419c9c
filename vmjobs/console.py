"""Input frames of an interactive job: what a client sends toward the job's stdin.

One format for the whole way (docs/guest-protocol.md, "The input port"; docs/api.md,
"Console"): the client sends frames to the daemon's console stream (or a direct run's core
takes them in-process), the core checks each one (`FrameReader`, untrusted: bounded) and writes
it to the guest's input port, where `images/vmjob-console.c` reads the same frames:

    d <n>\\n<n bytes>      input bytes, 1 <= n <= MAX_DATA
    w <rows> <cols>\\n     the terminal's window size, 1..MAX_SIZE each (tty jobs)
    e\\n                   end of input: a pipe job reads end of file, a tty job gets VEOF

A job's stdin mode is its spec's `stdin`: None (no input: /dev/null, as before), "pipe"
(`vmjob run -i`) or "tty" (`vmjob shell`: a pseudo-terminal in the guest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

STDIN_MODES = ("pipe", "tty")
MAX_DATA = 65536  # bytes of one data frame (the guest helper's bound)
MAX_SIZE = 9999  # rows or columns
MAX_HEADER = 32  # bytes of a frame's header line, newline included
DETACH_KEY = b"\x1d"  # Ctrl+]: `vmjob attach` leaves the job running (as virsh console)


class FrameError(ValueError):
    """A frame that breaks the format (one line, for the sender)."""


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class Resize:
    rows: int
    cols: int


@dataclass(frozen=True)
class End:
    pass


Frame = Data | Resize | End


def encode(frame: Frame) -> bytes:
    """The frame's bytes. Raises FrameError for an empty or oversized data frame or a size
    out of range (split input with `data_frames`)."""
    if isinstance(frame, Data):
        if not 1 <= len(frame.data) <= MAX_DATA:
            raise FrameError(f"a data frame holds 1 to {MAX_DATA} bytes, not {len(frame.data)}")
        return b"d %d\n" % len(frame.data) + frame.data
    if isinstance(frame, Resize):
        if not (1 <= frame.rows <= MAX_SIZE and 1 <= frame.cols <= MAX_SIZE):
            raise FrameError(f"a window size is 1..{MAX_SIZE} rows and columns, not "
                             f"{frame.rows}x{frame.cols}")
        return b"w %d %d\n" % (frame.rows, frame.cols)
    return b"e\n"


def data_frames(data: bytes) -> list[bytes]:
    """`data` (any length) as encoded data frames of at most MAX_DATA bytes each."""
    return [encode(Data(data[i:i + MAX_DATA])) for i in range(0, len(data), MAX_DATA)]


class FrameReader:
    """Frames from a byte stream that arrives in arbitrary pieces: `feed(bytes)` returns the
    frames completed so far. Raises FrameError on the first malformed frame (the stream is
    then unusable: the sender is refused)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data_left = 0

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buffer += chunk
        frames: list[Frame] = []
        while self._buffer:
            if self._data_left:
                if len(self._buffer) < self._data_left:
                    break
                frames.append(Data(bytes(self._buffer[:self._data_left])))
                del self._buffer[:self._data_left]
                self._data_left = 0
                continue
            end = self._buffer.find(b"\n", 0, MAX_HEADER)
            if end < 0:
                if len(self._buffer) >= MAX_HEADER:
                    raise FrameError("a frame header longer than "
                                     f"{MAX_HEADER} bytes")
                break
            header = bytes(self._buffer[:end]).split(b" ")
            del self._buffer[:end + 1]
            frame = _header(header)
            if isinstance(frame, int):
                self._data_left = frame
            else:
                frames.append(frame)
        return frames


def _number(word: bytes, low: int, high: int) -> int:
    if not (word.isdigit() and len(word) <= 6 and low <= int(word) <= high):
        raise FrameError(f"bad number {word[:12]!r} in a frame header")
    return int(word)


def _header(words: list[bytes]) -> Frame | int:
    """A frame without payload, or the length of the data that follows."""
    if words == [b"e"]:
        return End()
    if len(words) == 2 and words[0] == b"d":
        return _number(words[1], 1, MAX_DATA)
    if len(words) == 3 and words[0] == b"w":
        return Resize(_number(words[1], 1, MAX_SIZE), _number(words[2], 1, MAX_SIZE))
    raise FrameError(f"unknown frame {b' '.join(words)[:20]!r}")


# Where a client's frames go: the daemon's console stream, or a direct run's core
# (`Daemon.send_input`); False once the job takes no more input.
Send = Callable[[list[bytes]], bool]


class InputSource(Protocol):
    """What produces a job's input frames (`vmjobs.terminal.TerminalInput`)."""

    def start(self, send: Send) -> None: ...

    def stop(self) -> None: ...
