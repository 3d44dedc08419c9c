"""Ctrl+C and SIGTERM while `vmjob run` follows a job, turned into an exception its code
catches where it can act on it (cancel the job, then follow it to its end)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

# SIGHUP: the terminal went away (a closed window, a dropped ssh session under `vmjob shell`)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """Ctrl+C (SIGINT), SIGTERM or SIGHUP while a job runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise Interrupted; before and after, their handlers are
    what they were."""
    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

