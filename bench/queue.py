"""Queue benchmark: what a user of the command line pays, against Slurm on the same machine.

    python bench/queue.py [--submits 200] [--clients 4] [--calls 15] [--cancels 100]
                          [--chain 0] [--no-slurm] [--baseline TREE] [--root DIR]
                          [--image-spool DIR]

Starts its own `vmjob serve` (a fresh spool under --root whose image comes from an already
built spool, --image-spool) and cordons its only host, so every job queues and no guest boots;
then, through the `vmjob` command line exactly as a user runs it (a process per call, with a
config file):

1. CPU per call (user + sys of the process, `RUSAGE_CHILDREN`) of `vmjob list` and
   `vmjob submit`, beside Python's own start (`python -c pass`), the floor of any Python CLI;
2. submits/s: --submits jobs from --clients concurrent `vmjob submit` processes (and through
   the API alone, threads in this process, for reference);
3. `vmjob list` latency (wall) with those jobs queued;
4. cancels/s: --cancels jobs one `vmjob cancel JOB` per job, then the rest in one
   `vmjob cancel --state QUEUED`.

When `slurmctld`, `slurmd`, `munged` and the Slurm client commands are installed (Debian:
`slurmctld slurmd slurm-client munge`), the same steps run against a Slurm started by this
bench on 127.0.0.1 (its own munged socket, config, state and ports in a temp dir; its node
drained so that jobs pend), stopped by pid afterwards, and the figures get ratios. Otherwise
it says so and prints what it measured.

--baseline TREE (a checkout of another vmjobs, e.g. `git worktree add /tmp/base main~20`):
its `vmjob list` and `vmjob submit` run against the same daemon in the same run, for a
before/after of the client's cost.

--chain M (guests boot: run under the guest lock) adds the old hand-over latency: M short jobs
one after another on the uncordoned host, from the guest's power-off to the next one running.

Figures, not assertions. Needs root and a running libvirtd (the daemon connects to it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmjobs.client import Client  # noqa: E402
from vmjobs.errors import VmjobsError  # noqa: E402
from vmjobs.transport import Target  # noqa: E402

# the children import this tree, compiled once (as an installed package is), not per call
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": "/tmp/vmjobs-bench-pyc"}
ENV.pop("PYTHONDONTWRITEBYTECODE", None)


def describe(name: str, values: Sequence[float], unit: str = "ms", scale: float = 1000) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{name:<34} median {statistics.median(values):8.1f} {unit}  min "
            f"{min(values):8.1f}  max {max(values):8.1f}  stdev {spread:7.1f}  (n={len(values)})")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # cwd "/": `python -m` puts the working directory first on sys.path, which would load the
    # tree the bench was started in whatever PYTHONPATH says
    done = subprocess.run(argv, capture_output=True, text=True, env=env or ENV, timeout=300,
                          cwd="/")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... exited {done.returncode}: {done.stderr}")
    return done


def per_call(argv: Sequence[str], calls: int, env: dict[str, str] | None = None
             ) -> tuple[list[float], list[float]]:
    """(CPU seconds, wall seconds) of each of `calls` sequential runs of `argv`."""
    cpu, wall = [], []
    for _ in range(calls):
        before, started = children_cpu(), time.perf_counter()
        run(argv, env)
        wall.append(time.perf_counter() - started)
        cpu.append(children_cpu() - before)
    return cpu, wall


def concurrently(argvs: Sequence[Sequence[str]], clients: int,
                 env: dict[str, str] | None = None) -> tuple[float, float, list[str]]:
    """Run every argv once, from `clients` threads each starting one process at a time:
    (wall seconds, CPU seconds of all the processes, their stdouts)."""
    outputs: list[str] = []
    lock = threading.Lock()
    shares = [list(argvs[i::clients]) for i in range(clients)]

    def client(mine: list[Sequence[str]]) -> None:
        for argv in mine:
            out = run(argv, env).stdout
            with lock:
                outputs.append(out)

    before, started = children_cpu(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, children_cpu() - before, outputs


@dataclass
class Figures:
    """One system's results; None where it was not measured."""

    floor_cpu: float | None = None  # the interpreter's own start, for a Python CLI
    list_cpu: float | None = None
    submit_cpu: float | None = None
    submits_s: float | None = None
    api_submits_s: float | None = None
    list_ms: float | None = None
    cancel_each_s: float | None = None
    cancel_one_call_s: float | None = None


# --- vmjobs ---------------------------------------------------------------------------------


def start_daemon(root: Path, image_spool: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    spool = root / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    for shared in ("images", "cache"):
        (spool / shared).symlink_to(image_spool.resolve() / shared)
    reserved = [c for c in range(os.cpu_count() or 2) if c != 0]  # room for one 1-vCPU job
    host: dict[str, Any] = {"name": "local", "uri": "qemu:///system"}
    if reserved:
        host["reserved_cpus"] = ",".join(map(str, reserved))
    config = root / "config.yaml"
    sock = root / "vmjobs.sock"
    config.write_text(yaml.safe_dump({"spool": str(spool), "virt_type": "qemu",
                                      "socket": str(sock), "hosts": [host]}))
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "vmjobs", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    client = Client(Target(sock))
    for _ in range(600):
        try:
            client.status()
            return proc, sock, config
        except VmjobsError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise SystemExit(f"daemon did not start; see {root / 'daemon.log'}")


def bench_vmjobs(config: Path, sock: Path, args: argparse.Namespace) -> Figures:
    vmjob = [sys.executable, "-m", "vmjobs", "--config", str(config)]
    client = Client(Target(sock))
    for _ in client.host_action("local", "drain", {}):
        pass  # cordoned: every job queues, no guest boots
    figures = Figures()
    cpu, _ = per_call([sys.executable, "-c", "pass"], args.calls)
    figures.floor_cpu = statistics.median(cpu)

    took, cpu_total, out = concurrently(
        [[*vmjob, "submit", "--", "true"] for _ in range(args.submits)], args.clients)
    figures.submits_s, figures.submit_cpu = args.submits / took, cpu_total / args.submits
    print(f"vmjobs  submit: {args.submits} by {args.clients} CLI clients in {took:.2f} s = "
          f"{figures.submits_s:.1f}/s; CPU per call {figures.submit_cpu * 1000:.1f} ms")
    ids = [line.strip() for line in out]

    api_ids: list[str] = []
    lock = threading.Lock()

    def api_submitter(count: int) -> None:
        mine = Client(Target(sock))
        for _ in range(count):
            job_id = mine.submit({"argv": ["true"]})["id"]
            with lock:
                api_ids.append(job_id)

    started = time.perf_counter()
    threads = [threading.Thread(target=api_submitter, args=(args.submits // args.clients,))
               for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures.api_submits_s = len(api_ids) / (time.perf_counter() - started)
    client.cancel_many({"jobs": api_ids})  # back to --submits queued
    print(f"vmjobs  submit through the API alone: {figures.api_submits_s:.1f}/s")

    queued = len(client.jobs())
    cpu, wall = per_call([*vmjob, "list"], args.calls)
    figures.list_cpu, figures.list_ms = statistics.median(cpu), statistics.median(wall) * 1000
    print(describe(f"vmjobs  list ({queued} queued), wall", wall))
    print(describe("vmjobs  list, CPU per call", cpu))
    cpu, _ = per_call([sys.executable, "-m", "vmjobs", "list", "--url", f"unix://{sock}"],
                      args.calls)
    print(describe("vmjobs  list --url (no config), CPU", cpu))
    print(describe("python -c pass, CPU (the floor)", [figures.floor_cpu]))

    if args.baseline:
        baseline(args.baseline, config, args.calls)

    each = ids[-args.cancels:]
    started = time.perf_counter()
    for job_id in reversed(each):
        run([*vmjob, "cancel", job_id])
    figures.cancel_each_s = len(each) / (time.perf_counter() - started)
    rest = len(client.jobs())
    started = time.perf_counter()
    answer = json.loads(run([*vmjob, "cancel", "--state", "QUEUED", "--json"]).stdout)
    figures.cancel_one_call_s = len(answer["cancelled"]) / (time.perf_counter() - started)
    print(f"vmjobs  cancel: {len(each)} one per call {figures.cancel_each_s:.1f}/s; "
          f"{rest} in one call {figures.cancel_one_call_s:.1f}/s")
    assert not client.jobs(), "jobs left queued"
    client.close()
    return figures


def baseline(tree: Path, config: Path, calls: int) -> None:
    """Another tree's CLI against the same daemon: CPU and wall per call, beside ours."""
    env = {**ENV, "PYTHONPATH": str(tree.resolve())}
    vmjob = [sys.executable, "-m", "vmjobs", "--config", str(config)]
    run([*vmjob, "--help"], env)  # its bytecode, once
    cpu, wall = per_call([*vmjob, "list"], calls, env)
    print(describe(f"baseline list, CPU ({tree})", cpu))
    print(describe("baseline list, wall", wall))
    cpu, wall = per_call([*vmjob, "submit", "--", "true"], calls, env)
    print(describe("baseline submit, CPU", cpu))
    print(describe("baseline submit, wall", wall))
    cpu, wall = per_call([*vmjob, "submit", "--", "true"], calls)
    print(describe("vmjobs  submit (one client), CPU", cpu))
    print(describe("vmjobs  submit (one client), wall", wall))


def chain_latency(config: Path, sock: Path, spool: Path, chain: int) -> None:
    """M short jobs one after another (guests boot): hand-over times from the events."""
    run([sys.executable, "-m", "vmjobs", "--config", str(config), "uncordon", "local"])
    client = Client(Target(sock))
    ids = [client.submit({"argv": ["true"]})["id"] for _ in range(chain)]
    views = []
    for job_id in ids:
        while not client.call("GET", f"/v1/jobs/{job_id}/wait?timeout=300")["finished"]:
            pass
        views.append(client.job(job_id))
    client.close()

    def at(view: dict[str, Any], state: str) -> float:
        return next(e["time"] for e in view["events"] if e["state"] == state)

    def stopped_at(job_id: str) -> float:
        text = Path(f"/var/log/libvirt/qemu/vmjob-{job_id}.log").read_text(errors="replace")
        stamp = [line for line in text.splitlines() if ": shutting down" in line][-1][:28]
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()

    noticed, qemu_gone, to_placed, to_running = [], [], [], []
    for previous, following in zip(views, views[1:], strict=False):
        end = previous["events"][-1]["time"]
        console = spool / "jobs" / previous["id"] / "console.local.log"
        noticed.append(end - console.stat().st_mtime)
        qemu_gone.append(stopped_at(previous["id"]) - end)
        to_placed.append(at(following, "PLACED") - stopped_at(previous["id"]))
        to_running.append(at(following, "RUNNING") - end)
    print(f"chain of {chain} jobs ('true'), one at a time:")
    print(describe("  guest power-off -> end recorded", noticed))
    print(describe("  end recorded -> libvirt stop", qemu_gone))
    print(describe("  libvirt stop -> next PLACED", to_placed))
    print(describe("  end recorded -> next RUNNING", to_running))


# --- Slurm ----------------------------------------------------------------------------------

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def slurm_cluster(cpus: int) -> Iterator[dict[str, str]]:
    """munged + slurmctld + slurmd on 127.0.0.1 with their own files; the environment the
    client commands need. Everything is stopped by pid on the way out."""
    work = Path(tempfile.mkdtemp(prefix="vmjobs-bench-slurm-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    munge_sock = work / "munge.sock"
    node = "benchnode"
    try:
        procs.append(subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={munge_sock}", f"--pid-file={work}/munged.pid",
             f"--seed-file={work}/munged.seed", f"--log-file={work}/munged.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: munge_sock.exists(), 10, "munged's socket")
        for d in ("state", "spool"):
            (work / d).mkdir()
        conf = work / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=vmjobsbench", "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={munge_sock}", "CredType=cred/munge",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={work}/state", f"SlurmdSpoolDir={work}/spool",
            f"SlurmctldPidFile={work}/slurmctld.pid", f"SlurmdPidFile={work}/slurmd.pid",
            f"SlurmctldLogFile={work}/slurmctld.log", f"SlurmdLogFile={work}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SchedulerType=sched/backfill",
            "MpiDefault=none", "ReturnToService=2", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "MaxArraySize=1001",
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs={cpus} State=UNKNOWN",
            "PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                        text=True).stdout.count("UP") > 0, 30, "slurmctld")
        procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: "idle" in subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout,
            60, "slurmd to register")
        # drained, like vmjobs' cordoned host: jobs pend, nothing runs
        run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=bench"], env)
        yield env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm: no {what} after {timeout:.0f}s")
        time.sleep(0.1)


def bench_slurm(env: dict[str, str], args: argparse.Namespace) -> Figures:
    figures = Figures()
    sbatch = ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"]
    took, cpu_total, out = concurrently([sbatch] * args.submits, args.clients, env)
    figures.submits_s, figures.submit_cpu = args.submits / took, cpu_total / args.submits
    ids = [line.strip().split(";")[0] for line in out]
    print(f"slurm   sbatch: {args.submits} by {args.clients} clients in {took:.2f} s = "
          f"{figures.submits_s:.1f}/s; CPU per call {figures.submit_cpu * 1000:.1f} ms")
    cpu, wall = per_call(["squeue"], args.calls, env)
    figures.list_cpu, figures.list_ms = statistics.median(cpu), statistics.median(wall) * 1000
    print(describe(f"slurm   squeue ({len(ids)} pending), wall", wall))
    print(describe("slurm   squeue, CPU per call", cpu))
    each = ids[-args.cancels:]
    started = time.perf_counter()
    for job_id in reversed(each):
        run(["scancel", job_id], env)
    figures.cancel_each_s = len(each) / (time.perf_counter() - started)
    rest = len(ids) - len(each)
    started = time.perf_counter()
    run(["scancel", "--state=PENDING", "--user=root"], env)
    wait_for(lambda: not run(["squeue", "-h", "-t", "PENDING"], env).stdout.strip(), 60,
             "empty queue")
    figures.cancel_one_call_s = rest / (time.perf_counter() - started)
    print(f"slurm   scancel: {len(each)} one per call {figures.cancel_each_s:.1f}/s; {rest} "
          f"in one call {figures.cancel_one_call_s:.1f}/s")
    return figures


def table(ours: Figures, slurm: Figures | None) -> None:
    rows = [("CPU per `list` call (ms)", "list_cpu", 1000), ("CPU per `submit` call (ms)",
            "submit_cpu", 1000), ("submits/s, CLI clients", "submits_s", 1),
            ("list latency with queue (ms)", "list_ms", 1),
            ("cancels/s one per call", "cancel_each_s", 1),
            ("cancels/s one call", "cancel_one_call_s", 1)]
    print(f"\n{'':<32}{'vmjobs':>10}{'slurm':>10}{'vmjobs/slurm':>14}")
    for name, key, scale in rows:
        ours_v = getattr(ours, key)
        theirs = getattr(slurm, key) if slurm else None
        ratio = f"{ours_v / theirs:.2f}x" if ours_v and theirs else "-"
        print(f"{name:<32}{ours_v * scale:>10.1f}"
              f"{theirs * scale if theirs else float('nan'):>10.1f}{ratio:>14}")
    if ours.floor_cpu:
        print(f"{'python -c pass CPU (ms)':<32}{ours.floor_cpu * 1000:>10.1f}")
    print(f"{'submits/s, API alone':<32}{(ours.api_submits_s or 0):>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--calls", type=int, default=15, help="runs per latency figure")
    parser.add_argument("--cancels", type=int, default=100)
    parser.add_argument("--chain", type=int, default=0,
                        help="hand-over latency over M short jobs (boots guests)")
    parser.add_argument("--no-slurm", action="store_true")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another vmjobs tree whose CLI is measured beside this one")
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/vmjobs-bench-queue"))
    parser.add_argument("--image-spool", type=Path,
                        default=Path(os.environ.get("VMJOBS_TEST_SPOOL",
                                                    "/var/tmp/vmjobs-daemon-spool")))
    args = parser.parse_args()
    if not (args.image_spool / "images").is_dir():
        raise SystemExit(f"no built image in {args.image_spool}: run 'vmjob image build' with a "
                         "config whose spool is there, or pass --image-spool")
    args.cancels = min(args.cancels, args.submits)
    args.root.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "vmjobs", "--help"])  # compile this tree's bytecode once
    proc, sock, config = start_daemon(args.root, args.image_spool)
    try:
        ours = bench_vmjobs(config, sock, args)
        if args.chain:
            chain_latency(config, sock, args.root / "spool", args.chain)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    slurm = None
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if args.no_slurm:
        print("slurm: skipped (--no-slurm)")
    elif missing:
        print(f"slurm: not installed here ({', '.join(missing)} missing; Debian: apt-get "
              "install slurmctld slurmd slurm-client munge): vmjobs figures only")
    else:
        try:
            with slurm_cluster(os.cpu_count() or 2) as env:
                slurm = bench_slurm(env, args)
        except (RuntimeError, SystemExit) as exc:
            print(f"slurm: could not be run here ({exc}): vmjobs figures only")
    table(ours, slurm)


if __name__ == "__main__":
    main()
