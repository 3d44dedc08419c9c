"""How much of what a job holds it leaves idle, and when it wants it back: the owner model of
borrowing (docs/borrowing.md).

Pure. An SWF trace gives, per job, the processors it held (P) and its CPU time averaged over
them, hence the processors it kept busy on average, U = average CPU time x P / run time. It
does not say *when* in the run the idle share was idle. The model chosen here is the
two-phase job of Amdahl's law (Amdahl, "Validity of the single processor approach to
achieving large scale computing capabilities", AFIPS 1967): a serial phase on one processor
(set-up, input, a serial solver step), then a parallel phase on all P. The serial phase's
length s is the one that makes the average come out at the trace's U over the run T:

    1 x s + P x (T - s) = U x T   =>   s = T x (P - U) / (P - 1)

(U below 1: the whole run is serial). So every job keeps its trace's CPU time exactly, its
P - 1 other processors are idle during the serial phase, and at its end the owner needs them
all back at once — the give-back event. A job whose U is unknown, or at least P, or with
P = 1, leaves nothing idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OwnerUse:
    """When an owner's cores other than its first are idle: seconds after its start."""

    serial_s: int  # the serial phase: [0, serial_s) on one core; then all cores busy

    def lendable(self, lend_after_s: int) -> tuple[int, int] | None:
        """(from, until) seconds after the owner's start during which its idle cores may be
        lent, given that a core is lent only once idle for `lend_after_s`; None: never."""
        if self.serial_s <= lend_after_s:
            return None
        return lend_after_s, self.serial_s


def owner_use(procs: int, used_cpus: float, run_s: int) -> OwnerUse:
    """The two-phase model above for a job of `procs` processors that ran `run_s` seconds and
    kept `used_cpus` processors busy on average (-1: unknown). The serial phase is rounded
    down to a whole second, so the owner never gets its cores back later than the model says.
    """
    if procs < 2 or used_cpus < 0 or used_cpus >= procs or run_s <= 0:
        return OwnerUse(0)
    share = (procs - max(used_cpus, 1.0)) / (procs - 1)
    return OwnerUse(min(run_s, math.floor(share * run_s)))
