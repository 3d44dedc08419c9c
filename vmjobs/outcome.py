"""The exit code a client (`vmjob wait`, `vmjob run`) gives for a job's end.

The job's own code when it reported one; otherwise a code that says what happened, the same
as `vmjob run` without a daemon uses (124 as timeout(1), 125, 130).
"""

from __future__ import annotations

from typing import Any

EXIT_NOT_STARTED = 75  # EX_TEMPFAIL: --wait-timeout expired or --no-wait found no room; retry later
EXIT_TIMEOUT = 124  # the job's time limit stopped it
EXIT_NO_RESULT = 125  # it ran, but there is no exit status (output refused, guest died, lost)
# `vmjob wait --timeout` passed before the job ended (it goes on); distinct from every code
# vmjob gives a job's end, so a script can tell "not yet" from an outcome
EXIT_WAIT_EXPIRED = 3
EXIT_CANCELLED = 130  # cancelled (Ctrl+C on `vmjob run`, or `vmjob cancel`)


def exit_code(view: dict[str, Any]) -> int:
    state = view["state"]
    if state in ("COMPLETED", "FAILED") and view.get("exit_code") is not None:
        return int(view["exit_code"])
    return {
        "TIMEOUT": EXIT_TIMEOUT,
        "CANCELLED": EXIT_CANCELLED,
        "EXPIRED": EXIT_NOT_STARTED,
    }.get(state, EXIT_NO_RESULT)
