"""Job arrays: one submission, one job per index (Slurm's `sbatch --array`).

`--array 1-100%10`, `--array 1,3,5-7`: indices are whole numbers from 0 to MAX_INDEX, given
as single numbers and inclusive ranges `A-B` separated by commas; `%N` lets at most N jobs of
the array run at once (the others wait in the queue, `daemon/queue.py`). The array has an id
of its own (`new_job_id()`); its jobs are `ARRAY_INDEX` (e.g. `3f9a1c2e_7`), and each sees
`$VMJOB_ARRAY_ID` and `$VMJOB_ARRAY_INDEX` in its environment.

The bound follows Slurm's default `MaxArraySize=1001`: indices 0..1000, so one request can
never create more than 1001 jobs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_INDEX = 1000  # Slurm's default MaxArraySize (1001) - 1
_TEXT = re.compile(r"^(?P<ranges>[0-9,\-]+)(%(?P<limit>[0-9]+))?$")
_RANGE = re.compile(r"^(?P<low>[0-9]{1,7})(-(?P<high>[0-9]{1,7}))?$")
ENV_ID, ENV_INDEX = "VMJOB_ARRAY_ID", "VMJOB_ARRAY_INDEX"
# keys of a stored job spec (the store's JSON) that make it an array's member
KEY_ID, KEY_INDEX, KEY_LIMIT = "array_id", "array_index", "array_limit"


class ArrayError(ValueError):
    """An array text that is refused; the message says why (the caller names the field)."""


@dataclass(frozen=True)
class JobArray:
    """Indices in ascending order, without repeats; `limit`: at most this many running."""

    indices: tuple[int, ...]
    limit: int | None = None

    def text(self) -> str:
        """The canonical text: ranges merged, `parse_array(a.text()) == a`."""
        parts: list[str] = []
        start = prev = self.indices[0]
        for index in (*self.indices[1:], None):
            if index is not None and index == prev + 1:
                prev = index
                continue
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            if index is not None:
                start = prev = index
        return ",".join(parts) + (f"%{self.limit}" if self.limit is not None else "")


def parse_array(text: str) -> JobArray:
    """`"1-100%10"`, `"1,3,5-7"` -> JobArray. Raises ArrayError (one line) on anything else:
    an empty or reversed range, an index above MAX_INDEX, `%0`, a repeated index."""
    match = _TEXT.match(text.strip())
    if not match:
        raise ArrayError(f"{text!r} is not an index list like 1-100, 1,3,5-7 or 0-99%10")
    indices: set[int] = set()
    for part in match["ranges"].split(","):
        bounds = _RANGE.match(part)
        if not bounds:
            raise ArrayError(f"{text!r}: {part!r} is not an index or a range A-B")
        low = int(bounds["low"])
        high = int(bounds["high"]) if bounds["high"] is not None else low
        if high < low:
            raise ArrayError(f"{text!r}: range {part} ends before it starts")
        if high > MAX_INDEX:
            raise ArrayError(f"{text!r}: indices go from 0 to {MAX_INDEX} (at most "
                             f"{MAX_INDEX + 1} jobs in an array)")
        span = set(range(low, high + 1))
        if span & indices:
            raise ArrayError(f"{text!r}: index {min(span & indices)} is given twice")
        indices |= span
    limit = int(match["limit"]) if match["limit"] is not None else None
    if limit is not None and not 1 <= limit <= MAX_INDEX + 1:
        raise ArrayError(f"{text!r}: %N must be from 1 to {MAX_INDEX + 1}")
    return JobArray(tuple(sorted(indices)), limit)


def member_id(array_id: str, index: int) -> str:
    return f"{array_id}_{index}"


def member_spec(spec: Mapping[str, Any], array_id: str, index: int,
                limit: int | None) -> dict[str, Any]:
    """A member's stored spec: the array's, with its place in the array."""
    return {**spec, KEY_ID: array_id, KEY_INDEX: index, KEY_LIMIT: limit}


def array_of(spec: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """(array id, its %N limit) of a stored job spec, or None for a job of no array."""
    array_id = spec.get(KEY_ID)
    if not isinstance(array_id, str):
        return None
    limit = spec.get(KEY_LIMIT)
    return array_id, limit if isinstance(limit, int) else None


def array_env(spec: Mapping[str, Any]) -> dict[str, str]:
    """What a member adds to the guest's environment (nothing for a job of no array)."""
    if not isinstance(spec.get(KEY_ID), str) or not isinstance(spec.get(KEY_INDEX), int):
        return {}
    return {ENV_ID: spec[KEY_ID], ENV_INDEX: str(spec[KEY_INDEX])}
