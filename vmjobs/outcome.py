"""How a job's end is told: the exit code a client (`vmjob run`, `vmjob wait`) gives, and the
one line it prints when the job gave no exit status. The same for a direct `vmjob run` and one
through the daemon.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_NOT_STARTED = 75  # EX_TEMPFAIL: --wait-timeout expired or --no-wait found no room; retry later
EXIT_TIMEOUT = 124  # the job's time limit stopped it
EXIT_NO_RESULT = 125  # it ran, but there is no exit status (output refused, guest died, lost)
# `vmjob wait --timeout` passed before the job ended (it goes on); distinct from every code
# vmjob gives a job's end, so a script can tell "not yet" from an outcome
EXIT_WAIT_EXPIRED = 3
EXIT_CANCELLED = 130  # cancelled (Ctrl+C on `vmjob run`, or `vmjob cancel`)
EXIT_TERMINATED = 143  # `vmjob run` got SIGTERM and cancelled its job (128 + 15)


def exit_code(view: dict[str, Any]) -> int:
    """`view`: a job as the API shows it (`state`, `exit_code`)."""
    state = view["state"]
    if state in ("COMPLETED", "FAILED") and view.get("exit_code") is not None:
        return int(view["exit_code"])
    return {
        "TIMEOUT": EXIT_TIMEOUT,
        "CANCELLED": EXIT_CANCELLED,
        "EXPIRED": EXIT_NOT_STARTED,
    }.get(state, EXIT_NO_RESULT)


def ended_with_output(view: dict[str, Any]) -> bool:
    """The job reported an exit status, so its /job/out is its own (worth fetching)."""
    return view["state"] in ("COMPLETED", "FAILED") and view.get("exit_code") is not None


def end_line(view: dict[str, Any]) -> str | None:
    """What a client says about a job that gave no exit status (`id`, `state`, `message`);
    None for one that did (its code says it all)."""
    if view.get("exit_code") is not None:
        return None
    return f"job {view['id']} {view['state']}: {view.get('message') or ''}".rstrip(": ")


def cancelled_line(job_id: str, signum: int) -> str:
    """What `vmjob run` says when its Ctrl+C (SIGINT) or SIGTERM cancelled the job."""
    name = signal.Signals(signum).name
    return f"job {job_id} cancelled ({name}); guest destroyed, reservation released"


def interrupted_exit(signum: int) -> int:
    """`vmjob run`'s code when a signal cancelled its job: 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM, 129 for SIGHUP), as a shell reports it."""
    return 128 + signum
