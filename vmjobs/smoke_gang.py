"""`vmjob smoke migrate --gang FILE`: a live migration checked from another member of a gang.

The cross-host CI case of docs/multinode.md ("Example: a migration checked from another
node"), driven through the daemon: the gang in FILE (docs/examples/migration-smoke.yaml is
the reference) runs a workload on node0 that prints `tick N` lines and serves its counter on
the gang's network, and a checker on node1. Per round the host migrates node0 (the daemon's
own `migrate`, so the gang's network and control port follow it), tells the gang through the
kv store, and reads back what each member saw. The kv protocol the gang's programs follow:

    node0 sets  `ready`            once it serves (the host waits for it)
    host sets   `moved.R`          `more` or `last`, after round R's migration
    node1 sets  `seen.R`           what it saw over the network after barrier `round.R`:
                                   `A B` (the counter first and once it went on) or
                                   `FAILED ...`

Checks: every migration succeeded, node1's every `seen.R` is two counts that grew, node0's
`tick` lines have no gap and no repeat (counted from 0), and the gang ended 0. The gang is
cancelled if the smoke test stops early: nothing is left running.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from vmjobs.client import ApiFailure, Client
from vmjobs.errors import VmjobsError

READY = "ready"
_TICK = re.compile(r"^tick (\d+)$", re.MULTILINE)


def moved_key(number: int) -> str:
    return f"moved.{number}"


def seen_key(number: int) -> str:
    return f"seen.{number}"


@dataclass(frozen=True)
class GangRound:
    """One round: `member` moved `source` -> `destination` (`seconds`: the migrate call as the
    client timed it; `detail`: the daemon's account, with its downtime); what the moved
    member counted (`moved_saw`: its last tick before the move and after it) and what the
    checker read over the network (`checker_saw`: its `seen.R`)."""

    number: int
    member: str
    source: str | None
    destination: str | None
    seconds: float
    detail: str
    moved_saw: str
    checker_saw: str
    ok: bool


@dataclass
class GangReport:
    gang: str
    rounds: list[GangRound] = field(default_factory=list)
    ticks: int = 0
    exit_code: int | None = None
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations and bool(self.rounds)

    def to_json(self) -> dict[str, Any]:
        return {"gang": self.gang, "passed": self.passed, "ticks": self.ticks,
                "exit_code": self.exit_code, "violations": self.violations,
                "rounds": [asdict(r) for r in self.rounds]}


def ticks_of(text: str) -> list[int]:
    """The counters of the `tick N` lines in a member's output, in order."""
    return [int(n) for n in _TICK.findall(text)]


def counter_problems(counters: list[int], what: str = "tick") -> list[str]:
    """A counter that must start at 0 and go up by one: every repeat and skip (at most 20)."""
    problems: list[str] = []
    if counters and counters[0] != 0:
        problems.append(f"the first {what} seen is {counters[0]}, not 0")
    for before, after in zip(counters, counters[1:], strict=False):
        if after == before:
            problems.append(f"{what} {after} repeated")
        elif after != before + 1:
            problems.append(f"counter skipped from {before} to {after}")
    return problems[:20]


def seen_ok(value: str | None) -> bool:
    """node1's `seen.R`: two counts of node0's counter, the second larger."""
    parts = (value or "").split()
    return len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[1]) > int(parts[0])


def _kv_path(gang: str) -> str:
    return f"/v1/jobs/{quote(gang, safe='')}/kv"


def kv_wait(client: Client, gang: str, key: str, timeout_s: float,
            poll_s: float = 0.25) -> str:
    """The value of `key` in the gang's store once it is set. VmjobsError if the gang ends
    first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(client.call("GET", f"{_kv_path(gang)}?{urlencode({'key': key})}")["value"])
        except ApiFailure as exc:
            if exc.status not in (404, 409):  # 404: not set yet; 409: not (yet) running
                raise
        view = client.job(gang)
        if view.get("finished"):
            raise VmjobsError(f"gang {gang} ended ({view.get('message') or view['state']}) "
                              f"before it set {key!r}")
        if time.monotonic() > deadline:
            raise VmjobsError(f"gang {gang} did not set {key!r} within {timeout_s:.0f}s")
        time.sleep(poll_s)


def _output(client: Client, job_id: str) -> str:
    return "".join(client.logs(job_id))


def _last_tick(client: Client, job_id: str) -> int | None:
    ticks = ticks_of(_output(client, job_id))
    return ticks[-1] if ticks else None


def _migrate(client: Client, job_id: str, to: str | None,
             max_downtime_ms: int | None) -> dict[str, Any]:
    """The daemon's migrate (NDJSON progress); its one result. VmjobsError on an error."""
    body = {"to": to, "max_downtime_ms": max_downtime_ms}
    for line in client.job_action(job_id, "migrate", body):
        if "error" in line:
            raise VmjobsError(str(line["error"]))
        if "results" in line:
            return dict(line["results"][0])
    raise VmjobsError("the daemon ended the answer without a result")


def destinations(rounds: int, to: str | None, home: str | None) -> list[str | None]:
    """Round R's destination: `to` on odd rounds, back `home` on even ones; with no `to`,
    None each time (the placement engine chooses, away from the other members)."""
    if to is None:
        return [None] * rounds
    return [to if n % 2 == 1 else home for n in range(1, rounds + 1)]


def smoke_gang(client: Client, body: dict[str, Any], rounds: int, to: str | None = None,
               max_downtime_ms: int | None = None, timeout_s: float = 600.0,
               note: Callable[[str], None] = lambda _m: None,
               on_round: Callable[[GangRound], None] | None = None) -> GangReport:
    """Submit the gang `body` (a submit body with `nodes`), move its node0 `rounds` times and
    report per round what node0 and node1 saw (`max_downtime_ms`: the migrations' initial
    downtime limit; None: the daemon's default; `timeout_s`: the longest wait for each of
    the gang's steps). Raises VmjobsError if the gang cannot be submitted or stops following
    the protocol (it is cancelled then)."""
    if rounds < 1:
        raise VmjobsError("--rounds must be at least 1")
    gang = str(client.submit(body)["id"])
    member0 = f"{gang}.0"
    report = GangReport(gang)
    ended = False
    try:
        note(f"gang {gang} submitted; waiting for node0 to serve")
        kv_wait(client, gang, READY, timeout_s)
        home = client.job(member0).get("host")
        for number, target in enumerate(destinations(rounds, to, home), start=1):
            before = _last_tick(client, member0)
            began = time.monotonic()
            try:
                moved = _migrate(client, member0, target, max_downtime_ms)
            except VmjobsError as exc:
                report.violations.append(f"round {number}: migrating {member0} failed: {exc}")
                moved = {"action": "failed", "detail": str(exc)}
            seconds = time.monotonic() - began
            after = _last_tick(client, member0)
            last = number == rounds or moved["action"] == "failed"
            client.call("POST", _kv_path(gang), {"key": moved_key(number),
                                                  "value": "last" if last else "more"})
            seen = kv_wait(client, gang, seen_key(number), timeout_s)
            ok = moved["action"] == "migrated" and seen_ok(seen)
            if not seen_ok(seen):
                report.violations.append(f"round {number}: node1 saw {seen!r} over the "
                                         "network, not node0's counter going on")
            done = GangRound(number, member0, moved.get("from"), moved.get("to"), seconds,
                             str(moved.get("detail", "")),
                             f"tick {before} -> tick {after}", seen, ok)
            report.rounds.append(done)
            note(f"round {number}: {format_round(done)}")
            if on_round is not None:
                on_round(done)
            if last:
                break
        view = client.wait(gang, timeout=timeout_s)
        ended = bool(view.get("finished"))
        if not ended:
            report.violations.append(f"gang {gang} did not end within {timeout_s:.0f}s")
        report.exit_code = view.get("exit_code")
        if ended and report.exit_code != 0:
            report.violations.append(f"gang {gang} ended {view.get('state')} "
                                     f"(exit {report.exit_code}): {view.get('message')}")
        ticks = ticks_of(_output(client, member0))
        report.ticks = len(ticks)
        report.violations += [f"node0: {p}" for p in counter_problems(ticks)]
        return report
    finally:
        if not ended:
            try:
                client.cancel(gang)
            except (VmjobsError, OSError) as exc:
                note(f"cancelling gang {gang} failed: {exc}")


def format_round(r: GangRound) -> str:
    return (f"{r.member} {r.source} -> {r.destination} in {r.seconds:.1f}s ({r.detail}); "
            f"node0 counted {r.moved_saw}; node1 read over the network: {r.checker_saw}"
            f"{'' if r.ok else '  FAILED'}")


def format_gang_report(report: GangReport) -> Iterable[str]:
    for r in report.rounds:
        yield f"round {r.number}: {format_round(r)}"
    yield f"node0: {report.ticks} ticks checked; gang {report.gang} exit code {report.exit_code}"
