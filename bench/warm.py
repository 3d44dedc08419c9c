"""Warm start benchmark: cold boot against restore from a template, interleaved, with ratios.

    python bench/warm.py [--runs N] [--cpus N] [--mem SIZE] [--spool DIR]

Two figures per mode, each the median (min, max) over N interleaved rounds (cold, warm, cold,
warm, ...), so both modes see the same machine load:

- `vmjob run` to the job's first line, the whole command as a user runs it (Python start,
  placement, the store, the guest), with `start: cold` and `start: warm`;
- the guest alone: `template.launch` to the first byte of the job's output, in this process
  (no CLI, no store; the guest pinned to host cpu 1), which is what a warm start changes.

The first warm run makes the template; its time is printed apart. Runs real guests: take the
guest lock (`flock /tmp/vmjobs-guest.lock python bench/warm.py`). Figures, not assertions:
see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/placement.py and bench/queue.py would shadow the placement package and the standard
# library's queue: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import yaml  # noqa: E402

from placement import Allocation, NodeShare  # noqa: E402
from vmjobs import template  # noqa: E402
from vmjobs.guest import GuestEnd, GuestPlan, JobFiles, follow_output  # noqa: E402
from vmjobs.image import resolve_image  # noqa: E402
from vmjobs.units import parse_size_mib  # noqa: E402
from vmjobs.virt import Connection  # noqa: E402
from vmjobs.virt.conn import open_uri  # noqa: E402
from vmjobs.virt.events import start_event_loop  # noqa: E402

URI = "qemu:///system"


def write_config(path: Path, spool: Path, start: str) -> Path:
    path.write_text(yaml.safe_dump({
        "spool": str(spool), "virt_type": "qemu", "start": start,
        "hosts": [{"name": "local", "uri": URI}],
    }))
    return path


def cli_first_line(config: Path, cpus: int, mem: str) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmjobs", "--config", str(config), "run", "--cpus", str(cpus),
         "--mem", mem, "--", "echo", "first"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    first = time.perf_counter() - started
    _, err = proc.communicate()
    if proc.returncode != 0 or line.strip() != "first":
        raise SystemExit(f"run failed: exit {proc.returncode}, first line {line!r}: {err}")
    return first


def guest_first_byte(conn: Connection, spool: Path, mode: str, cpus: int,
                     memory_mib: int, round_no: int) -> float:
    host_cpus = tuple(range(1, 1 + cpus))
    alloc = Allocation(host="local", cpus=host_cpus, memory_mib=memory_mib,
                       nodes=(NodeShare(node=0, cpus=host_cpus, memory_mib=memory_mib),))
    job_id = f"bench-{mode}-{round_no}"
    files = JobFiles.of(spool, job_id)
    shutil.rmtree(files.dir, ignore_errors=True)
    plan = GuestPlan(job_id=job_id, owner="root", owner_uid=0, argv=("echo", "first"), env={},
                     allocation=alloc, image=resolve_image(spool, "default"), virt_type="qemu",
                     output_disk_mib=256)
    started = time.perf_counter()
    dom, how = template.launch(mode, conn, plan, files, spool, lambda _t: None,
                               lambda _how: None)
    first = None
    guest_end = GuestEnd(conn, dom, files)
    try:
        for chunk in follow_output(files, guest_end):
            if chunk and first is None:
                first = time.perf_counter() - started
        guest_end.wait_stopped(30)
    finally:
        guest_end.close()
    shutil.rmtree(files.dir, ignore_errors=True)
    if first is None or how != mode:
        raise SystemExit(f"{mode} guest printed nothing (started {how})")
    return first


def describe(name: str, values: list[float]) -> str:
    return (f"{name:<28} median {statistics.median(values):6.3f}s  min {min(values):6.3f}s  "
            f"max {max(values):6.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--mem", default="256M")
    parser.add_argument("--spool", type=Path, default=Path("/var/tmp/vmjobs-bench-spool"))
    args = parser.parse_args()
    work = args.spool / "bench-warm"
    work.mkdir(parents=True, exist_ok=True)
    cold_cfg = write_config(work / "cold.yaml", args.spool, "cold")
    warm_cfg = write_config(work / "warm.yaml", args.spool, "warm")
    subprocess.run([sys.executable, "-m", "vmjobs", "--config", str(cold_cfg), "image",
                    "build"], check=True, capture_output=True)
    started = time.perf_counter()
    cli_first_line(warm_cfg, args.cpus, args.mem)
    print(f"first warm run, making the template: {time.perf_counter() - started:.2f}s")

    memory_mib = parse_size_mib(args.mem)
    start_event_loop()  # before connecting: a guest's end comes as a lifecycle event
    conn = open_uri(URI)
    cli: dict[str, list[float]] = {"cold": [], "warm": []}
    direct: dict[str, list[float]] = {"cold": [], "warm": []}
    try:
        for n in range(args.runs):
            for mode, config in (("cold", cold_cfg), ("warm", warm_cfg)):
                cli[mode].append(cli_first_line(config, args.cpus, args.mem))
                direct[mode].append(guest_first_byte(conn, args.spool, mode, args.cpus,
                                                     memory_mib, n))
    finally:
        conn.close()
    print(f"{args.runs} interleaved rounds, {args.cpus} vCPU, {args.mem}, TCG")
    for mode in ("cold", "warm"):
        print(describe(f"vmjob run, {mode}", cli[mode]))
    for mode in ("cold", "warm"):
        print(describe(f"guest only, {mode}", direct[mode]))
    for name, figures in (("vmjob run", cli), ("guest only", direct)):
        ratio = statistics.median(figures["cold"]) / statistics.median(figures["warm"])
        print(f"{name}: warm is {ratio:.2f}x faster than cold (medians)")


if __name__ == "__main__":
    main()
