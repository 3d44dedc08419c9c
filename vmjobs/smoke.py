"""`vmjob smoke migrate`: a cross-host live-migration smoke test of a guest that checks its clocks.

Boots a transient guest (no store, no daemon: only libvirt connections and the shared spool)
whose job is `clockprobe` (images/clockprobe.c, built static here and shipped as the job's
input): every 100 ms it prints `tick N TSC MONOTONIC_NS REALTIME_NS`. The guest is migrated
A -> B -> A ... for N rounds with `virt.migration.migrate_domain`, re-pinned on each host. The
console of each host goes to its own segment in the spool; the byte offsets at each
switch-over put the stream back together in order. Checks:

- the counter never skips and never repeats;
- TSC and CLOCK_MONOTONIC never go backwards;
- the largest gap between two ticks around each switch-over stays within the downtime
  libvirt reported plus a slack (`gap_slack_ms`).

A violation makes the result fail (the CLI exits non-zero); the guest is always destroyed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from placement import Allocation, NodeShare
from vmjobs import guest_protocol
from vmjobs.cbuild import build_static
from vmjobs.convergence import Policy
from vmjobs.errors import VmjobsError
from vmjobs.image import Image
from vmjobs.jobs import new_job_id
from vmjobs.smoke_gang import counter_problems
from vmjobs.virt import Connection, Domain, VirtError, domain_xml
from vmjobs.virt.conn import destroy_quietly, open_uri
from vmjobs.virt.conn import start as start_domain
from vmjobs.virt.domain_xml import DomainSpec
from vmjobs.virt.migration import (
    MigrationFailed,
    migratable_xml,
    migrate_domain,
    migration_uri,
    retarget_xml,
)
from vmjobs.virt.pinning import pinning_of

INTERVAL_MS = 100
PROBE_SOURCE = "clockprobe.c"


@dataclass(frozen=True)
class Endpoint:
    name: str  # a config host name, or the URI itself
    uri: str
    virt_type: str


@dataclass(frozen=True)
class Tick:
    counter: int
    tsc: int
    mono_ns: int
    real_ns: int
    end: int  # byte offset just past the line in the stitched stream


@dataclass(frozen=True)
class Round:
    number: int
    source: str
    destination: str
    duration_s: float
    downtime_ms: int | None
    memory_mib: float | None
    gap_ms: float | None  # largest tick-to-tick gap around the switch-over
    cpu: int  # the host cpu the vCPU is pinned to on the destination
    pinned: bool  # vcpuPinInfo on the destination agreed


@dataclass
class Report:
    rounds: list[Round] = field(default_factory=list)
    ticks: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations and bool(self.rounds)


def build_probe(cache: Path) -> Path:
    """The static clockprobe binary for this source, built once per source hash."""
    return build_static(PROBE_SOURCE, cache, "smoke migrate")


def parse_ticks(text: str) -> list[Tick]:
    ticks = []
    offset = 0
    for line in text.splitlines(keepends=True):
        offset += len(line.encode(errors="replace"))
        parts = line.split()
        if len(parts) == 5 and parts[0] == "tick" and all(p.isdigit() for p in parts[1:]):
            ticks.append(Tick(int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]),
                              offset))
    return ticks


def check_ticks(ticks: list[Tick]) -> list[str]:
    """Counter consecutive from 0, TSC and CLOCK_MONOTONIC non-decreasing, in stream order."""
    problems = counter_problems([t.counter for t in ticks])
    for before, after in zip(ticks, ticks[1:], strict=False):
        if after.tsc < before.tsc:
            problems.append(f"TSC went backwards at tick {after.counter}")
        if after.mono_ns < before.mono_ns:
            problems.append(f"CLOCK_MONOTONIC went backwards at tick {after.counter}")
    return problems[:20]


def gap_around(ticks: list[Tick], boundary: int, window: int = 5) -> float | None:
    """Largest tick-to-tick CLOCK_MONOTONIC gap (ms) next to a stream byte offset."""
    index = next((i for i, t in enumerate(ticks) if t.end > boundary), None)
    if index is None:
        return None
    near = ticks[max(index - window, 0):index + window + 1]
    gaps = [(b.mono_ns - a.mono_ns) / 1e6 for a, b in zip(near, near[1:], strict=False)]
    return max(gaps) if gaps else None


def _allocation(host: str, cpu: int, memory_mib: int) -> Allocation:
    return Allocation(host=host, cpus=(cpu,), memory_mib=memory_mib,
                      nodes=(NodeShare(node=0, cpus=(cpu,), memory_mib=memory_mib),))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read(path: Path, start: int, end: int | None) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read() if end is None else handle.read(end - start)
    except FileNotFoundError:
        return b""


def _cell_node(conn: Connection) -> int:
    """The NUMA node that holds cpu 0 on this host (0 on almost every machine)."""
    import xml.etree.ElementTree as ET

    caps = ET.fromstring(conn.getCapabilities())
    for cell in caps.findall("./host/topology/cells/cell"):
        if cell.find("./cpus/cpu[@id='0']") is not None:
            return int(cell.get("id", "0"))
    return 0


def smoke_migrate(spool: Path, image: Image, source: Endpoint, destination: Endpoint,
                  rounds: int, memory_mib: int, policy: Policy | None = None,
                  gap_slack_ms: float = 1000.0, boot_timeout_s: float = 120.0,
                  note: Callable[[str], None] = lambda _m: None,
                  on_round: Callable[[Round], None] | None = None) -> Report:
    if rounds < 1:
        raise VmjobsError("--rounds must be at least 1")
    if source.uri == destination.uri:
        raise VmjobsError("--from and --to are the same host")
    policy = policy or Policy()
    probe = build_probe(spool / "cache")
    conns: dict[str, Connection] = {}
    for end in (source, destination):
        try:
            conns[end.name] = open_uri(end.uri)
        except VirtError as exc:
            for conn in conns.values():
                conn.close()
            raise VmjobsError(f"cannot connect to {end.name} at {end.uri}: "
                              f"{exc.get_error_message()}") from None
    run_id = f"smoke-{new_job_id()}"
    workdir = spool / "smoke" / run_id
    dom: Domain | None = None
    report = Report()
    try:
        workdir.mkdir(parents=True)
        workdir.chmod(0o755)
        inputs = workdir / "input"
        inputs.mkdir()
        shutil.copyfile(probe, inputs / "clockprobe")
        (inputs / "clockprobe").chmod(0o755)
        cpus = {end.name: conns[end.name].getInfo()[2] for end in (source, destination)}
        # alternate cpus so every move really re-pins (cpu 0 on A, the last cpu on B)
        pin = {source.name: 0, destination.name: cpus[destination.name] - 1}
        node = {end.name: _cell_node(conns[end.name]) for end in (source, destination)}
        initrd = workdir / "initrd"
        guest_protocol.write_job_initrd(
            guest_protocol.JobSpec(job_id=run_id, argv=("./clockprobe",), env={}, cpus=1,
                                   memory_mib=memory_mib, input_dir=inputs),
            image.initrd, initrd)
        output = workdir / "output.raw"
        guest_protocol.create_output_disk(output, 1 << 20)

        def console(end: Endpoint) -> Path:
            return workdir / f"console.{end.name}.log"

        def alloc_on(end: Endpoint) -> Allocation:
            a = _allocation(end.name, pin[end.name], memory_mib)
            return Allocation(a.host, a.cpus, a.memory_mib,
                              (NodeShare(node[end.name], a.cpus, memory_mib),))

        xml = domain_xml.build(DomainSpec(
            name=f"vmjob-{run_id}", job_id=run_id, owner="smoke", owner_uid=0,
            virt_type=source.virt_type, allocation=alloc_on(source), kernel=image.boot_kernel,
            loader=image.firmware, initrd=initrd, console_log=console(source), output_disk=output,
            clock_channel=True))
        note(f"booting a {memory_mib} MiB guest on {source.name}")
        dom = start_domain(conns[source.name], xml)
        deadline = time.monotonic() + boot_timeout_s
        while b"tick 5 " not in _read(console(source), 0, None):
            if time.monotonic() > deadline:
                raise VmjobsError(f"the probe printed nothing within {boot_timeout_s:.0f}s "
                                  f"(console: {console(source)})")
            time.sleep(0.2)
        segments: list[tuple[Path, int]] = [(console(source), 0)]  # (file, start offset)
        ends: list[int] = []  # each finished segment's end offset in its file
        here, there = source, destination
        for number in range(1, rounds + 1):
            time.sleep(1.0)  # let ticks accumulate on this host
            target = alloc_on(there)
            dest_xml = retarget_xml(migratable_xml(dom), target,
                                    frozenset(), console(there))
            start_there = _size(console(there))
            try:
                outcome = migrate_domain(dom, conns[there.name], dest_xml,
                                         migration_uri(there.uri), policy, memory_mib)
            except MigrationFailed as exc:
                report.violations.append(f"round {number}: migration {here.name} -> "
                                         f"{there.name} failed: {exc}")
                break
            note(f"round {number}: {here.name} -> {there.name} in {outcome.duration_s:.2f}s, "
                 f"downtime {outcome.downtime_ms} ms")
            ends.append(_size(console(here)))
            segments.append((console(there), start_there))
            dom = conns[there.name].lookupByName(f"vmjob-{run_id}")
            actual = sorted(pinning_of(dom)[0])
            pinned = actual == [target.cpus[0]]
            if not pinned:
                report.violations.append(f"round {number}: vCPU 0 on {there.name} is pinned to "
                                         f"cpus {actual}, not to cpu {target.cpus[0]}")
            memory = outcome.memory_bytes / (1 << 20) if outcome.memory_bytes else None
            report.rounds.append(Round(number, here.name, there.name, outcome.duration_s,
                                       outcome.downtime_ms, memory, None, target.cpus[0],
                                       pinned))
            here, there = there, here
        time.sleep(1.0)
        destroy_quietly(dom)
        dom = None
        ends.append(_size(segments[-1][0]))
        stream = b""
        boundaries = []
        for (path, start), end in zip(segments, ends, strict=True):
            if stream:
                boundaries.append(len(stream))
            stream += _read(path, start, end)
        ticks = parse_ticks(stream.decode(errors="replace"))
        report.ticks = len(ticks)
        report.violations += check_ticks(ticks)
        for i, done in enumerate(report.rounds):
            gap = gap_around(ticks, boundaries[i]) if i < len(boundaries) else None
            report.rounds[i] = Round(**{**done.__dict__, "gap_ms": gap})
            allowed = INTERVAL_MS + (done.downtime_ms or 0) + gap_slack_ms
            if gap is not None and gap > allowed:
                report.violations.append(
                    f"round {done.number}: largest gap {gap:.0f} ms around the switch-over; "
                    f"downtime was {done.downtime_ms} ms (allowed up to {allowed:.0f} ms)")
            if on_round is not None:
                on_round(report.rounds[i])
        return report
    finally:
        destroy_quietly(dom)
        for conn in conns.values():
            conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def format_table(report: Report) -> list[str]:
    rows = [("ROUND", "FROM", "TO", "TOTAL", "DOWNTIME", "MEMORY", "MAX GAP", "PINNED")]
    for r in report.rounds:
        rows.append((str(r.number), r.source, r.destination, f"{r.duration_s:.2f}s",
                     f"{r.downtime_ms} ms" if r.downtime_ms is not None else "?",
                     f"{r.memory_mib:.0f} MiB" if r.memory_mib is not None else "?",
                     f"{r.gap_ms:.0f} ms" if r.gap_ms is not None else "?",
                     f"cpu {r.cpu}" + ("" if r.pinned else " (NOT)")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
