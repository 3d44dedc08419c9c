"""What a held reservation asks for: a job spec's resource fields, without a command.

`vmjob reserve` takes the same spec options as `run` (so `--profile`, `-f job.yaml` and every
check are the same); what only makes sense for a guest (a command, its environment, input,
output, an image, an array, being preemptible) is refused. `--duration` is the spec's
`time_limit`: how long the reservation is held (none: as long as its client's connection).
Used by the CLI (`vmjob reserve`) and the API (`POST /v1/reservations`), so both refuse the
same input with the same line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmjobs.spec import Spec, SpecError, parse

# A reservation runs nothing; the spec's parser wants a command, so this stands in for it and
# is never stored.
_NO_COMMAND = ("(reservation)",)
# field -> the option that sets it: refused for a reservation
_GUEST_ONLY = {"env": "--env", "input": "--input", "output": "--output", "image": "--image",
               "array": "--array", "preemptible": "--preemptible"}


def check(spec: Spec) -> Spec:
    """`spec` if it describes a reservation; raises SpecError (exit 2, HTTP 400) naming the
    first field that only a job can have."""
    default = Spec(argv=_NO_COMMAND)
    for name, option in _GUEST_ONLY.items():
        if getattr(spec, name) != getattr(default, name):
            raise SpecError(f"{option} is for jobs; a reservation holds resources only "
                            "(give it to 'vmjob run --reservation R')")
    return spec


def parse_hold(data: Mapping[str, Any]) -> Spec:
    """A reservation's spec from the API's JSON body (a job spec without `argv`).
    Raises SpecError."""
    if data.get("argv") is not None:
        raise SpecError("a reservation runs no command: give none (argv)")
    return check(parse({**data, "argv": list(_NO_COMMAND)}))


def with_no_command(params: dict[str, Any]) -> dict[str, Any]:
    """Command-line parameters with the stand-in command, for `spec_from_options`."""
    return {**params, "argv": _NO_COMMAND}


def to_body(spec: Spec) -> dict[str, Any]:
    """The JSON body of `POST /v1/reservations` for `spec` (its canonical form, no argv)."""
    body = spec.to_dict()
    del body["argv"]
    return body
