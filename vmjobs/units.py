"""Parsing of the sizes, durations and cpu lists people type."""

from __future__ import annotations

import math
import re

from vmjobs.errors import VmjobsError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
MIB = 1 << 20


def parse_size_mib(text: str, what: str = "size") -> int:
    """'64G', '512M', '1.5G', '1073741824' (bytes) -> MiB, rounded up to a whole MiB."""
    match = _SIZE.match(str(text))
    if not match:
        raise VmjobsError(
            f"invalid {what} {text!r}: use a number of bytes or a size like 512M, 1.5G, 64G"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    size_bytes = number * (1 << _SIZE_SHIFT[unit])
    if not math.isfinite(size_bytes):
        raise VmjobsError(f"invalid {what} {text!r}: too large")
    if size_bytes <= 0:
        raise VmjobsError(f"invalid {what} {text!r}: must be greater than zero")
    return max(1, math.ceil(size_bytes / MIB))


def format_mib(mib: float) -> str:
    if mib >= 1024:
        return f"{mib / 1024:.1f} GiB".replace(".0 GiB", " GiB")
    return f"{mib:g} MiB"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_DURATION_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """'90', '30s', '5m', '2h', '1h30m' -> seconds (> 0)."""
    compact = str(text).replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise VmjobsError(f"invalid {what} {text!r}: use e.g. 90, 30s, 5m, 2h or 1h30m")
    seconds = sum(float(n) * _DURATION_SECONDS[u.lower()] for n, u in parts)
    if seconds <= 0:
        raise VmjobsError(f"invalid {what} {text!r}: must be greater than zero")
    return seconds


def parse_cpu_list(text: str) -> frozenset[int]:
    """libvirt-style cpu list: '0-3,^2,6' -> {0, 1, 3, 6}."""
    chosen: set[int] = set()
    excluded: set[int] = set()
    for raw in str(text).split(","):
        item = raw.strip()
        if not item:
            continue
        target = excluded if item.startswith("^") else chosen
        item = item.lstrip("^")
        try:
            if "-" in item:
                low, high = (int(x) for x in item.split("-", 1))
                if low > high or low < 0:
                    raise ValueError
                target.update(range(low, high + 1))
            else:
                value = int(item)
                if value < 0:
                    raise ValueError
                target.add(value)
        except ValueError:
            raise VmjobsError(f"invalid cpu list {text!r}: use e.g. 0-3,^2,6") from None
    return frozenset(chosen - excluded)


def format_cpu_list(cpus: frozenset[int] | set[int] | tuple[int, ...] | list[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (the form libvirt's cpuset attributes take)."""
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = prev = None
    for cpu in ordered:
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:
            prev = cpu
        else:
            ranges.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = cpu
    if start is not None:
        ranges.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(ranges)
