"""Reading the Standard Workload Format (SWF) of the Parallel Workloads Archive.

Pure: takes lines, returns values. A job line has exactly 18 whitespace-separated numbers;
lines starting with ';' are header comments; blank lines are skipped; -1 (any negative number)
means unknown. Memory fields are KB per processor. Any other line is malformed: it is counted
by line number and left out rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FIELDS = 18


@dataclass(frozen=True)
class SwfJob:
    number: int
    submit: int  # seconds from the log's start
    wait: int
    run: int
    allocated_procs: int
    used_memory_kb: int  # per processor
    requested_procs: int
    requested_time: int
    requested_memory_kb: int  # per processor
    status: int
    user: int
    # Field 6: CPU seconds (user + system) averaged over the job's processors; below the run
    # time when the job left processors idle. -1: unknown.
    average_cpu_s: float = -1.0

    @property
    def procs(self) -> int:
        """Requested processors, falling back to allocated ones (-1 when neither is known)."""
        return self.requested_procs if self.requested_procs > 0 else self.allocated_procs

    @property
    def memory_kb_per_proc(self) -> int:
        """Requested memory, falling back to used memory (-1 when neither is known)."""
        if self.requested_memory_kb > 0:
            return self.requested_memory_kb
        return self.used_memory_kb


@dataclass(frozen=True)
class Trace:
    jobs: tuple[SwfJob, ...]
    header: tuple[str, ...]  # comment lines, without the ';'
    malformed: tuple[int, ...]  # line numbers that were neither comments nor 18 numbers


def _number(text: str) -> int:
    # Some logs write times and cpu seconds with decimals ("552.21"); int() of a float also
    # refuses "nan" (ValueError) and "inf" (OverflowError), which makes the line malformed.
    return int(float(text))


def parse_swf(lines: Iterable[str]) -> Trace:
    jobs: list[SwfJob] = []
    header: list[str] = []
    malformed: list[int] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(";"):
            header.append(line[1:].strip())
            continue
        fields = line.split()
        if len(fields) != FIELDS:
            malformed.append(lineno)
            continue
        try:
            f = [_number(x) for x in fields]
        except (ValueError, OverflowError):
            malformed.append(lineno)
            continue
        jobs.append(SwfJob(number=f[0], submit=f[1], wait=f[2], run=f[3], allocated_procs=f[4],
                           used_memory_kb=f[6], requested_procs=f[7], requested_time=f[8],
                           requested_memory_kb=f[9], status=f[10], user=f[11],
                           average_cpu_s=float(fields[5]) if f[5] >= 0 else -1.0))
    return Trace(tuple(jobs), tuple(header), tuple(malformed))
