"""`--json` for every command, and the one shape of a refusal under it.

With `--json` a command prints its result as JSON on stdout; a refusal then is one JSON object
on stdout too, `{"error": LINE, "code": CODE, "exit_code": N}` (the same line still goes to
stderr, and the exit code is the one the command has without --json). `code` is stable for
programs: "usage", "not_found", "forbidden", "ambiguous", "not_started", "does_not_fit",
"move_failed", "conflict", "daemon_lost", "no_daemon", "interrupted", "bad_key" (a wrong or
missing reservation key, exit 77), or "error" for anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from vmjobs.errors import DoesNotFit, NotFound, UsageError, VmjobsError

# an answer's HTTP status -> the code, when the daemon named none
# (a 400 without a code is a refusal of the daemon's, exit 1: "error", not "usage")
_STATUS_CODES = {403: "forbidden", 404: "not_found", 409: "conflict"}


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """The `--json` flag (parameter `as_json`), the same on every command."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable output on stdout; a refusal too, as "
                             '{"error": ..., "code": ...}.')(func)


def wants_json(args: Sequence[str]) -> bool:
    """Whether the command line asks for --json (before `--`: what follows is the job's)."""
    args = list(args)
    own = args[:args.index("--")] if "--" in args else args
    return "--json" in own


def error_code(exc: BaseException) -> str:
    """The stable `code` of a refusal (see the module's docstring)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status in _STATUS_CODES:
        return _STATUS_CODES[status]
    if isinstance(exc, UsageError | click.UsageError):
        return "usage"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, DoesNotFit):
        return "does_not_fit"
    if isinstance(exc, KeyboardInterrupt | click.Abort):
        return "interrupted"
    if isinstance(exc, VmjobsError):
        return getattr(type(exc), "json_code", "error")
    return "error"


def print_error(message: str, exc: BaseException, exit_code: int) -> None:
    """The JSON form of a refusal, on stdout (its one line goes to stderr as always)."""
    click.echo(json.dumps({"error": message, "code": error_code(exc), "exit_code": exit_code}))
