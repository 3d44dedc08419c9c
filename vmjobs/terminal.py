"""The client's end of an interactive job: its stdin read and sent as input frames
(`vmjobs.console`); for a job with a terminal (`vmjob shell`), the client's terminal in raw
mode, its window size sent first and again on every SIGWINCH.

Raw mode means every key goes to the guest as it is typed: Ctrl+C is the byte 0x03, which the
guest's terminal turns into SIGINT for its foreground process, not a signal to vmjob. The
terminal is put back as it was when the session stops, on an error, and (through the
caller's handlers: `interruptible`, the direct run's) on SIGINT, SIGTERM and SIGHUP; only a
SIGKILL leaves it raw (`reset` or `stty sane` repairs it).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from vmjobs.console import End, Resize, Send, data_frames, encode

READ_BYTES = 65536


def window_size(fd: int) -> Resize | None:
    """The terminal's size on `fd`, or None when `fd` is not a terminal (or reports 0x0)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if not (1 <= size.lines <= 9999 and 1 <= size.columns <= 9999):
        return None
    return Resize(size.lines, size.columns)


class TerminalInput:
    """Reads `fd` (stdin) on a thread of its own and sends what it reads as frames.

    `tty_job`: the job has a terminal: when `fd` is one too it is put in raw mode from
    `start` until `stop` (or leaving the `with`), and window sizes are sent. `detach_key`: a
    byte that, typed on a terminal, ends the session without ending the job (`vmjob
    attach`); `on_detach` is then called. End of file on `fd` is sent as an end-of-input frame."""

    def __init__(self, tty_job: bool, fd: int = 0, detach_key: bytes | None = None,
                 on_detach: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.tty_job = tty_job
        self.is_terminal = os.isatty(fd)
        self.detach_key = detach_key if self.is_terminal else None
        self.on_detach = on_detach
        self.detached = threading.Event()
        self._saved: list[Any] | None = None
        self._raw_lock = threading.Lock()
        self._old_winch: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the terminal ---------------------------------------------------------------------------

    def __enter__(self) -> TerminalInput:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # woken by stop(), unless it is blocked in a send
            if self._thread.is_alive():
                return  # its pipe stays open for it (two fds, in a process about to end)
        with contextlib.suppress(OSError):
            os.close(self._wake_r)
        with contextlib.suppress(OSError):
            os.close(self._wake_w)

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent)."""
        with self._raw_lock:
            if self._saved is not None:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
                self._saved = None
        if self._old_winch is not None and \
                threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGWINCH, self._old_winch)
            self._old_winch = None

    def _on_winch(self, _signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    # --- the input ------------------------------------------------------------------------------

    def start(self, send: Send) -> None:
        """Raw mode (a tty job on a terminal) and input read and sent on a thread, from now
        until `stop`. Call from the main thread (SIGWINCH)."""
        if self.tty_job and self.is_terminal and self._saved is None:
            self._old_winch = signal.signal(signal.SIGWINCH, self._on_winch)
            with self._raw_lock:
                self._saved = termios.tcgetattr(self.fd)
                tty.setraw(self.fd, termios.TCSANOW)
        self._thread = threading.Thread(target=self._pump, args=(send,), name="stdin",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more input is read (the thread may still finish one send); the terminal is
        restored."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")
        self.restore()

    def _pump(self, send: Send) -> None:
        size = window_size(self.fd) if self.tty_job else None
        if size is not None and not send([encode(size)]):
            return
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                try:
                    woken = os.read(self._wake_r, 64)
                except OSError:
                    return
                if self._stopping.is_set():
                    return
                size = window_size(self.fd) if b"w" in woken and self.tty_job else None
                if size is not None and not send([encode(size)]):
                    return
            if self.fd not in ready:
                continue
            try:
                data = os.read(self.fd, READ_BYTES)
            except OSError:
                data = b""
            if not data:
                send([encode(End())])
                return
            if self.detach_key is not None and self.detach_key in data:
                before = data[:data.index(self.detach_key)]
                if before:
                    send(data_frames(before))
                self.detached.set()
                if self.on_detach is not None:
                    self.on_detach()
                return
            if not send(data_frames(data)):
                return
