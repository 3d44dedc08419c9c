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


def format_bytes(count: int) -> str:
    """1073741824 -> '1 GiB', 1048576 -> '1 MiB', 1000 -> '1000 bytes'."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.4g} {unit}"
    return f"{count} bytes"


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


# Linux's largest NR_CPUS (x86 MAXSMP): no host has a cpu id above this
MAX_CPU_ID = 8191


def parse_cpu_list(text: str) -> frozenset[int]:
    """libvirt-style cpu list: '0-3,^2,6' -> {0, 1, 3, 6}. Raises VmjobsError for bad syntax
    and for ids above MAX_CPU_ID (checked before any range is built)."""
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
                low_text, high_text = item.split("-", 1)
                if not low_text.strip():
                    raise ValueError  # "-3": a negative id
                low, high = _cpu_id(low_text, text), _cpu_id(high_text, text)
                if low > high:
                    raise ValueError
                target.update(range(low, high + 1))
            else:
                target.add(_cpu_id(item, text))
        except ValueError:
            raise VmjobsError(f"invalid cpu list {_clip(text)!r}: use e.g. 0-3,^2,6") from None
    return frozenset(chosen - excluded)


def _cpu_id(text: str, whole: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    if value > MAX_CPU_ID:
        raise VmjobsError(f"invalid cpu list {_clip(whole)!r}: cpu {value} is beyond the "
                          f"largest cpu id Linux has ({MAX_CPU_ID})")
    return value


def _clip(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


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
