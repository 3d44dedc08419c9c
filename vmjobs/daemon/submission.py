"""A submission as the API receives it: checked field by field, each refusal one line.

The body is the client's word only about *what* to run; who submits comes from the socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from placement import NumaPolicy, Request
from vmjobs.errors import VmjobsError
from vmjobs.runner import RunRequest, validate

FIELDS = {"argv", "env", "cpus", "memory_mib", "nics", "numa", "host", "pool", "priority",
          "preemptible", "image", "time_limit_s", "wait_timeout_s", "no_wait", "input", "output"}


@dataclass(frozen=True)
class Submission:
    argv: tuple[str, ...]
    request: Request
    env: dict[str, str] = field(default_factory=dict)
    image: str = "default"
    time_limit_s: float | None = None
    wait_timeout_s: float | None = None
    no_wait: bool = False
    input: str | None = None  # an upload token (POST /v1/uploads)
    output: str | None = None  # where the submitter wants /job/out; only clients use it


def _int(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VmjobsError(f"{name} must be an integer >= {minimum}")
    return value


def _seconds(body: dict[str, Any], name: str, minimum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise VmjobsError(f"{name} must be a number of seconds >= {minimum:g}")
    return float(value)


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise VmjobsError(f"{name} must be a non-empty string")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise VmjobsError(f"{name} must be true or false")
    return value


def parse(body: dict[str, Any]) -> Submission:
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise VmjobsError(f"unknown field(s) {', '.join(unknown)} (see docs/api.md)")
    argv = body.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise VmjobsError("argv must be a list of strings")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise VmjobsError("env must map names to strings")
    numa = body.get("numa", NumaPolicy.PREFER.value)
    if numa not in {p.value for p in NumaPolicy}:
        raise VmjobsError(f"numa must be one of {', '.join(p.value for p in NumaPolicy)}")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise VmjobsError("priority must be an integer")
    request = Request(
        cpus=_int(body, "cpus", 1, 1),
        memory_mib=_int(body, "memory_mib", 256, 1),
        nics=_int(body, "nics", 0, 0),
        numa=NumaPolicy(numa),
        host=_text(body, "host"),
        pool=_text(body, "pool"),
        priority=priority,
        preemptible=_flag(body, "preemptible"),
    )
    time_limit = _seconds(body, "time_limit_s", 0.001)
    wait_timeout = _seconds(body, "wait_timeout_s", 0)
    no_wait = body.get("no_wait", False)
    if not isinstance(no_wait, bool):
        raise VmjobsError("no_wait must be true or false")
    if no_wait and wait_timeout is not None:
        raise VmjobsError("give either --no-wait or --wait-timeout, not both")
    submission = Submission(
        argv=tuple(argv), request=request, env=dict(env), image=_text(body, "image") or "default",
        time_limit_s=time_limit, wait_timeout_s=wait_timeout, no_wait=no_wait,
        input=_text(body, "input"), output=_text(body, "output"),
    )
    # the same rules as `vmjob run`: a command, plain env names, none of vmjob's own
    validate(RunRequest(argv=submission.argv, request=request, env=submission.env))
    return submission
