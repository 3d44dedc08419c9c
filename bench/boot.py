"""Boot benchmark: how long from `vmjob run` to the job's first line and to its end.

    python bench/boot.py [--runs N] [--config FILE] [--cpus N] [--mem SIZE]

Prints the image build time (into a fresh spool, with downloaded packages already cached, and
the no-op rebuild), the image size, and per trivial job: time to the first output line and to
completion (median, min, max, stdev over N runs). Uses `virt_type` from the config (TCG on the
test machines). Figures, not assertions: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def vmjob(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmjobs", "--config", str(config), *args]


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


def one_run(config: Path, cpus: int, mem: str) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        vmjob(config, "run", "--cpus", str(cpus), "--mem", mem, "--", "echo", "first"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    first = time.perf_counter() - started
    proc.communicate()
    done = time.perf_counter() - started
    if proc.returncode != 0 or line.strip() != "first":
        raise SystemExit(f"run failed: exit {proc.returncode}, first line {line!r}")
    return first, done


def describe(name: str, values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{name:<22} median {statistics.median(values):6.2f}s  min {min(values):6.2f}s  "
            f"max {max(values):6.2f}s  stdev {spread:5.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--mem", default="256M")
    parser.add_argument("--config", type=Path, default=None,
                        help="config to use (default: a temporary one, TCG, local host)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="vmjobs-bench-"))
    config = args.config
    if config is None:
        spool = Path("/var/tmp/vmjobs-bench-spool")
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump({
            "spool": str(spool), "virt_type": "qemu",
            "hosts": [{"name": "local", "uri": "qemu:///system"}],
        }))
        # A fresh spool apart from the package cache: measures building, not downloading.
        for part in ("images", "jobs", "state.db", "state.db-wal", "state.db-shm"):
            target = spool / part
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    try:
        build = timed(vmjob(config, "image", "build"))
        rebuild = timed(vmjob(config, "image", "build"))
        listing = subprocess.run(vmjob(config, "image", "list", "--json"), check=True,
                                 capture_output=True, text=True).stdout
        print(f"image build            {build:6.2f}s  (packages cached)")
        print(f"image rebuild (no-op)  {rebuild:6.2f}s  ratio {build / rebuild:5.1f}x")
        print(f"image list             {listing.strip()}")
        one_run(config, args.cpus, args.mem)  # warm-up: page cache, libvirt caps
        firsts, dones = [], []
        for _ in range(args.runs):
            first, done = one_run(config, args.cpus, args.mem)
            firsts.append(first)
            dones.append(done)
        print(f"runs: {args.runs} x `vmjob run --cpus {args.cpus} --mem {args.mem} -- echo first`")
        print(describe("start -> first line", firsts))
        print(describe("start -> exit", dones))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
