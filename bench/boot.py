"""Boot benchmark: `vmjob run` to the job's first line, against raw QEMU booting the same image.

    python bench/boot.py [--rounds N] [--modes cold,raw,raw-before] [--config FILE]
                         [--cpus N] [--mem SIZE] [--no-build]

Modes, run interleaved (one of each per round, so load changes hit all of them alike):

- `cold`: `vmjob run -- echo hi` without a daemon (Python start, placement, domain XML,
  libvirt, TCG boot, init, job), from the command's start to its first output line.
- `raw`: `qemu-system-x86_64` run directly on the SHIPPED image with the boot vmjobs uses
  (the image's vmlinux or vmlinuz, its qboot.rom if any, domain_xml.CMDLINE, the same
  devices and chardevs as the libvirt domain, TCG, pinned to one cpu with taskset), to the
  same first line on the same output port. The floor vmjobs is measured against.
- `raw-before`: the same raw QEMU with the boot before the trims (bzImage, SeaBIOS, the old
  command line, the NIC modules loaded): what the trims bought.
- `raw-no-<trim>` with trim in vmlinux, qboot, cmdline, nicmods: all trims but that one.
- `warm`: `vmjob run` as `cold` but with `start: warm`: the guest is restored from a template
  of its image and shape (vmjobs/template.py); the warm-up run makes the template.

Prints median and p90 per mode and the ratio of each median to `raw`'s. Figures, never
assertions: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmjobs import guest_protocol  # noqa: E402
from vmjobs.image import Image, resolve_image  # noqa: E402
from vmjobs.outputwatch import OutputWatch  # noqa: E402
from vmjobs.virt.domain_xml import CLOCK_CHANNEL, CMDLINE, OUTPUT_CHANNEL  # noqa: E402

JOB_ARGV = ("echo", "hi")
FIRST_LINE = "hi"
OLD_CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"
TRIMS = ("vmlinux", "qboot", "cmdline", "nicmods")
BOOT_TIMEOUT_S = 120.0


def vmjob(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmjobs", "--config", str(config), *args]


# seconds from the start of each cold run to its "job <id> on <host>" note: Python start,
# imports, libvirt connections and inventory, placement and the store, before the guest
PLACED: list[float] = []


def run_cold(config: Path, cpus: int, mem: str) -> float:
    """Seconds from starting `vmjob run` to its first output line."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        vmjob(config, "run", "--cpus", str(cpus), "--mem", mem, "--", *JOB_ARGV),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors: list[str] = []

    def note_times(stream: IO[str]) -> None:
        placed = False
        for text in stream:
            if not placed and text.startswith("vmjob: job ") and " on " in text:
                PLACED.append(time.perf_counter() - started)
                placed = True
            errors.append(text)

    reader = threading.Thread(target=note_times, args=(proc.stderr,), daemon=True)
    reader.start()
    line = proc.stdout.readline()
    first = time.perf_counter() - started
    proc.stdout.read()
    proc.wait()
    reader.join()
    if proc.returncode != 0 or line.strip() != FIRST_LINE:
        raise SystemExit(f"vmjob run failed: exit {proc.returncode}, first line {line!r}: "
                         f"{''.join(errors).strip()[-300:]}")
    return first


@dataclass(frozen=True)
class RawBoot:
    """What a raw QEMU boot uses; `trims` are those of vmjobs' boot that apply."""

    trims: frozenset[str]

    def kernel(self, image: Image) -> Path:
        return image.boot_kernel if "vmlinux" in self.trims else image.kernel

    def firmware(self, image: Image) -> Path | None:
        return image.firmware if "qboot" in self.trims else None

    def cmdline(self) -> str:
        return CMDLINE if "cmdline" in self.trims else OLD_CMDLINE


def raw_command(image: Image, boot: RawBoot, work: Path, cpu: int, cpus: int,
                mem_mib: int) -> list[str]:
    """qemu-system-x86_64 as libvirt starts it for a job (see the log of any vmjob domain
    in /var/log/libvirt/qemu/), minus the monitor, sandbox and -S."""
    cmd = ["taskset", "-c", str(cpu), "qemu-system-x86_64",
           "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off", "-accel", "tcg",
           "-cpu", "qemu64", "-m", str(mem_mib), "-overcommit", "mem-lock=off",
           "-smp", f"{cpus},sockets=1,dies=1,cores={cpus},threads=1",
           "-display", "none", "-no-user-config", "-nodefaults", "-rtc", "base=utc"]
    firmware = boot.firmware(image)
    if firmware is not None:
        cmd += ["-bios", str(firmware)]
    cmd += ["-kernel", str(boot.kernel(image)), "-initrd", str(work / "initrd"),
            "-append", boot.cmdline(),
            "-device", "virtio-serial-pci,id=virtio-serial0,bus=pci.0,addr=0x2",
            "-blockdev", f"driver=file,filename={work / 'output.raw'},node-name=out-storage",
            "-blockdev", "driver=raw,file=out-storage,node-name=out-format",
            "-device", "virtio-blk-pci,bus=pci.0,addr=0x5,drive=out-format,werror=report,"
                       "rerror=report",
            "-chardev", f"file,id=charserial0,path={work / 'console.log'},append=on",
            "-device", "isa-serial,chardev=charserial0,index=0",
            "-chardev", f"socket,id=charchannel0,path={work / 'clock.sock'},server=on,wait=off",
            "-device", f"virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,"
                       f"name={CLOCK_CHANNEL}",
            "-chardev", f"pipe,id=charchannel1,path={work / 'output.0'}",
            "-device", f"virtserialport,bus=virtio-serial0.0,nr=2,chardev=charchannel1,"
                       f"name={OUTPUT_CHANNEL}"]
    return cmd


def run_raw(image: Image, boot: RawBoot, cpus: int, mem_mib: int) -> float:
    """Seconds from starting QEMU to the job's first line in its output file."""
    work = Path(tempfile.mkdtemp(prefix="vmjobs-bench-raw-"))
    try:
        # the old init loaded the NIC modules for every job: a NIC0 makes the new one do so
        nics = () if "nicmods" in boot.trims else ("0000:00:10.0",)
        guest_protocol.write_job_initrd(
            guest_protocol.JobSpec("bench", JOB_ARGV, {}, cpus, mem_mib, nics=nics),
            image.initrd, work / "initrd")
        guest_protocol.create_output_disk(work / "output.raw", 1 << 20)
        os.mkfifo(work / "output.0.in")
        (work / "output.0.out").touch()
        out = work / "output.0.out"
        with OutputWatch(work) as watch:
            started = time.perf_counter()
            proc = subprocess.Popen(raw_command(image, boot, work, cpu=1, cpus=cpus,
                                                mem_mib=mem_mib),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            first = None
            while first is None:
                if f"{FIRST_LINE}\n".encode() in out.read_bytes():
                    first = time.perf_counter() - started
                elif proc.poll() is not None or time.perf_counter() - started > BOOT_TIMEOUT_S:
                    break
                else:
                    watch.wait(0.5)
            try:
                proc.wait(BOOT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if first is None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SystemExit(f"raw QEMU gave no first line: {err.strip()[-300:]}")
        return first
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mode_runner(mode: str, config: Path, image: Image, cpus: int, mem: str,
                mem_mib: int, workdir: Path) -> Callable[[], float]:
    if mode == "cold":
        return lambda: run_cold(config, cpus, mem)
    if mode == "warm":
        # `vmjob run` with `start: warm` (vmjobs/template.py); the warm-up run makes the template
        settings = yaml.safe_load(config.read_text())
        settings["start"] = "warm"
        warm_config = workdir / "config-warm.yaml"
        warm_config.write_text(yaml.safe_dump(settings))
        return lambda: run_cold(warm_config, cpus, mem)
    if mode == "raw":
        trims = frozenset(TRIMS)
    elif mode == "raw-before":
        trims = frozenset()
    elif mode.startswith("raw-no-") and mode[len("raw-no-"):] in TRIMS:
        trims = frozenset(TRIMS) - {mode[len("raw-no-"):]}
    else:
        raise SystemExit(f"unknown mode {mode!r} (cold, warm, raw, raw-before, "
                         f"raw-no-{{{','.join(TRIMS)}}})")
    boot = RawBoot(trims)
    return lambda: run_raw(image, boot, cpus, mem_mib)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--modes", default="cold,raw",
                        help="comma-separated, run interleaved (default: cold,raw)")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--mem", default="256M")
    parser.add_argument("--config", type=Path, default=None,
                        help="config to use (default: a temporary one, TCG, local host, "
                             "spool /var/tmp/vmjobs-bench-spool)")
    parser.add_argument("--no-build", action="store_true",
                        help="use the spool's image as it is (default: `vmjob image build`)")
    args = parser.parse_args()
    if not args.mem.upper().endswith("M"):
        parser.error("--mem: give MiB, e.g. 256M")
    mem_mib = int(args.mem[:-1])
    modes = [m for m in args.modes.split(",") if m]

    workdir = Path(tempfile.mkdtemp(prefix="vmjobs-bench-"))
    try:
        config = args.config
        if config is None:
            config = workdir / "config.yaml"
            config.write_text(yaml.safe_dump({
                "spool": "/var/tmp/vmjobs-bench-spool", "virt_type": "qemu",
                "hosts": [{"name": "local", "uri": "qemu:///system"}],
            }))
        spool = Path(yaml.safe_load(config.read_text())["spool"])
        if not args.no_build:
            subprocess.run(vmjob(config, "image", "build"), check=True, capture_output=True)
        image = resolve_image(spool, "default")
        firmware = image.firmware.name if image.firmware else "SeaBIOS (QEMU's default)"
        print(f"image {image.id}: kernel {image.kernel_version}, boots "
              f"{image.boot_kernel.name}, firmware {firmware}")
        runners = {m: mode_runner(m, config, image, args.cpus, args.mem, mem_mib, workdir)
                   for m in modes}
        for run in runners.values():
            run()  # warm-up: page cache, libvirt's capabilities
        times: dict[str, list[float]] = {m: [] for m in modes}
        PLACED.clear()
        for _ in range(args.rounds):
            for mode, run in runners.items():
                times[mode].append(run())
        print(f"{args.rounds} rounds, interleaved; job `{' '.join(JOB_ARGV)}`, {args.cpus} "
              f"vCPU, {args.mem}, TCG; seconds from start to the job's first line")
        base = statistics.median(times["raw"]) if "raw" in times else None
        print(f"{'mode':<18}{'median':>8}{'p90':>8}{'min':>8}{'max':>8}  ratio to raw")
        for mode, values in times.items():
            median = statistics.median(values)
            ratio = f"{median / base:.2f}x" if base else "-"
            print(f"{mode:<18}{median:8.2f}{p90(values):8.2f}{min(values):8.2f}"
                  f"{max(values):8.2f}  {ratio}")
        if PLACED:
            print(f"cold: to its placement note (Python start, imports, libvirt connection and "
                  f"inventory, placement, store) median {statistics.median(PLACED):.2f}s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
