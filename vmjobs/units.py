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
# Slurm's clock forms (sbatch --time): MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_CLOCK = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                          r"|(?P<a>\d+):(?P<b>\d+)(?::(?P<c>\d+))?)$")
_DURATION_HINT = "use e.g. 90, 30s, 5m, 2h, 1h30m, 1:30:00 or 2-12:00:00"


def parse_duration(text: str, what: str = "duration") -> float:
    """A duration as people type it -> seconds (> 0).

    Forms: '90' (seconds), '30s', '5m', '2h', '3d', '1h30m'; and Slurm's clock forms
    (sbatch --time): 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS' ('1:30:00' is
    90 minutes, '2-12' is 60 hours). The leading field of a clock form may be any size
    ('90:00' is 90 minutes, as in Slurm); the fields after it are below 60 (below 24 for the
    hours after a day count). One difference from Slurm: a bare number is seconds here (as
    it always was in vmjob), where sbatch reads minutes; and 0 is refused rather than
    meaning "no limit". Raises VmjobsError (one line) otherwise.
    """
    compact = str(text).replace(" ", "")
    clock = _SLURM_CLOCK.match(compact)
    if clock:
        seconds = float(_clock_seconds(clock, text, what))
    else:
        parts = _DURATION_PART.findall(compact)
        if not compact or "".join(n + u for n, u in parts) != compact:
            raise VmjobsError(f"invalid {what} {text!r}: {_DURATION_HINT}")
        seconds = sum(float(n) * _DURATION_SECONDS[u.lower()] for n, u in parts)
    if seconds <= 0:
        raise VmjobsError(f"invalid {what} {text!r}: must be greater than zero")
    return seconds


def _clock_seconds(clock: re.Match[str], text: str, what: str) -> int:
    """The seconds of a matched Slurm clock form; fields after the first are bounded."""
    groups = clock.groupdict()
    if groups["days"] is not None:
        leading = int(groups["days"]) * 86400
        rest = [(groups["dh"], 24, 3600), (groups["dm"], 60, 60), (groups["ds"], 60, 1)]
    elif groups["c"] is not None:  # HH:MM:SS
        leading = int(groups["a"]) * 3600
        rest = [(groups["b"], 60, 60), (groups["c"], 60, 1)]
    else:  # MM:SS
        leading = int(groups["a"]) * 60
        rest = [(groups["b"], 60, 1)]
    total = leading
    for field, limit, unit in rest:
        if field is None:
            continue
        if int(field) >= limit:
            raise VmjobsError(f"invalid {what} {text!r}: {field} is out of range "
                              f"(at most {limit - 1} there); {_DURATION_HINT}")
        total += int(field) * unit
    return total


def format_clock(seconds: float) -> str:
    """Seconds -> squeue's TIME form, whole seconds rounded down: 65 -> '1:05', 3723 ->
    '1:02:03', 93784 -> '1-02:03:04'. `parse_duration` reads every result back."""
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


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
