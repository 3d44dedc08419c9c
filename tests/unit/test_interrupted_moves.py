"""Which copy of a guest survives a move that a daemon kill cut short (pure decision), and the
fail points that make such kills exact."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmjobs.daemon.recovery import Copy, Survivor, choose_copy

SRC, DST = "h1", "h2"
RUN_SRC, RUN_DST = Copy(SRC, True), Copy(DST, True)
PAUSED_SRC, PAUSED_DST = Copy(SRC, False), Copy(DST, False)


@pytest.mark.parametrize(("copies", "expected"), [
    # nothing left: the guest ended (or died) while nobody watched
    ([], Survivor(None, False, ())),
    # before migrate3 / migrate3 cancelled: the source alone, running
    ([RUN_SRC], Survivor(RUN_SRC, False, ())),
    # migrate3 completed: the destination alone
    ([RUN_DST], Survivor(RUN_DST, False, ())),
    # the hand-over: destination running, source paused -> never the paused source
    ([PAUSED_SRC, RUN_DST], Survivor(RUN_DST, False, (PAUSED_SRC,))),
    ([RUN_DST, PAUSED_SRC], Survivor(RUN_DST, False, (PAUSED_SRC,))),
    # cancelled before the destination ran: source running, incoming copy paused
    ([RUN_SRC, PAUSED_DST], Survivor(RUN_SRC, False, (PAUSED_DST,))),
    # both paused: the source is resumed, the never-run destination copy goes
    ([PAUSED_DST, PAUSED_SRC], Survivor(PAUSED_SRC, True, (PAUSED_DST,))),
    # a lone paused copy (a restore's guest before it resumed) is resumed
    ([PAUSED_DST], Survivor(PAUSED_DST, True, ())),
    # two running copies never happen with libvirt; the destination's ran last
    ([RUN_SRC, RUN_DST], Survivor(RUN_DST, False, (RUN_SRC,))),
])
def test_the_running_copy_wins_and_every_other_goes(copies: list[Copy],
                                                    expected: Survivor) -> None:
    assert choose_copy(SRC, DST, copies) == expected


def test_without_a_destination_the_source_copy_is_kept() -> None:
    assert choose_copy(SRC, None, [PAUSED_SRC]) == Survivor(PAUSED_SRC, True, ())
    assert choose_copy(SRC, None, [RUN_SRC]) == Survivor(RUN_SRC, False, ())


@pytest.mark.parametrize("armed", ["", "migrate:landed", "other:point,migrate:landed"])
def test_a_fail_point_kills_the_process_only_when_armed(armed: str) -> None:
    code = "from vmjobs import failpoints; failpoints.hit('migrate:landed'); print('alive')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"VMJOBS_FAILPOINTS": armed, "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": ":".join(sys.path)}, timeout=60)
    if "migrate:landed" in armed:
        assert proc.returncode == -9 and proc.stdout == ""
    else:
        assert proc.returncode == 0 and proc.stdout == "alive\n", proc.stderr
