"""Queue benchmark: submit throughput through the daemon's socket, and end-to-next-start latency.

    python bench/queue.py [--submits N] [--clients C] [--chain M] [--root DIR]

Starts its own `vmjob serve` (a fresh spool under --root whose image comes from an already
built spool, --image-spool) on a host with room for exactly one 1-vCPU job, then:

1. throughput: one job holds the host; N trivial jobs are submitted through the unix socket
   by C client threads (each request its own connection, as the CLI does) and queue up;
   prints submits/s, then cancels them (cancels/s) — no guest boots in this phase;
2. latency: M short jobs submitted at once run one after another; for each hand-over prints
   the time from the guest's power-off (its last console line) to the daemon recording the
   end, from there to libvirt stopping the domain (its QEMU log: the cores are free only
   then), from that stop to the next job's reservation (PLACED), and from the recorded end to
   the next guest running.

Figures, not assertions. Needs root, a running libvirtd and a built image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmjobs.client import Client  # noqa: E402
from vmjobs.errors import VmjobsError  # noqa: E402
from vmjobs.transport import Target  # noqa: E402


def describe(name: str, values: list[float], unit: str = "ms", scale: float = 1000) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{name:<34} median {statistics.median(values):8.1f} {unit}  min "
            f"{min(values):8.1f}  max {max(values):8.1f}  stdev {spread:7.1f}  (n={len(values)})")


def start_daemon(root: Path, image_spool: Path) -> tuple[subprocess.Popen[bytes], Path]:
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
    config.write_text(yaml.safe_dump({
        "spool": str(spool), "virt_type": "qemu", "socket": str(root / "vmjobs.sock"),
        "hosts": [host],
    }))
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "vmjobs", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT)
    client = Client(Target(root / "vmjobs.sock"))
    for _ in range(300):
        try:
            client.status()
            return proc, root / "vmjobs.sock"
        except VmjobsError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise SystemExit(f"daemon did not start; see {root / 'daemon.log'}")


def wait_state(client: Client, job_id: str, state: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.job(job_id)["state"] != state:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} not {state} after {timeout}s")
        time.sleep(0.1)


def throughput(sock: Path, submits: int, clients: int) -> None:
    client = Client(Target(sock))
    blocker = client.submit({"argv": ["sleep", "3600"]})["id"]
    wait_state(client, blocker, "RUNNING")
    ids: list[str] = []
    lock = threading.Lock()

    def submitter(count: int) -> None:
        mine = Client(Target(sock))
        for _ in range(count):
            job_id = mine.submit({"argv": ["true"]})["id"]
            with lock:
                ids.append(job_id)

    shares = [submits // clients + (1 if i < submits % clients else 0) for i in range(clients)]
    threads = [threading.Thread(target=submitter, args=(n,)) for n in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    queued = sum(1 for v in client.jobs() if v["state"] == "QUEUED")
    print(f"submit: {submits} jobs by {clients} clients in {took:.2f} s = "
          f"{submits / took:.0f} jobs/s ({queued} queued behind the one running)")
    started = time.perf_counter()
    for job_id in reversed(ids):  # from the tail: nothing gets to start meanwhile
        client.cancel(job_id)
    took = time.perf_counter() - started
    print(f"cancel (queued): {len(ids)} jobs in {took:.2f} s = {len(ids) / took:.0f} jobs/s")
    client.cancel(blocker)
    client.close()


def stopped_at(job_id: str) -> float:
    text = Path(f"/var/log/libvirt/qemu/vmjob-{job_id}.log").read_text(errors="replace")
    stamp = [line for line in text.splitlines() if ": shutting down" in line][-1][:28]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


def latency(sock: Path, spool: Path, chain: int) -> None:
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

    noticed, qemu_gone, to_placed, to_running, per_job = [], [], [], [], []
    for previous, following in zip(views, views[1:], strict=False):
        end = previous["events"][-1]["time"]
        console = spool / "jobs" / previous["id"] / "console.local.log"
        noticed.append(end - console.stat().st_mtime)
        qemu_gone.append(stopped_at(previous["id"]) - end)
        to_placed.append(at(following, "PLACED") - stopped_at(previous["id"]))
        to_running.append(at(following, "RUNNING") - end)
    for view in views:
        per_job.append(view["events"][-1]["time"] - at(view, "RUNNING"))
    print(f"chain of {chain} jobs ('true'), one at a time:")
    print(describe("  guest power-off -> end recorded", noticed))
    print(describe("  end recorded -> libvirt stop", qemu_gone))
    print(describe("  libvirt stop -> next PLACED", to_placed))
    print(describe("  end recorded -> next RUNNING", to_running))
    print(describe("  guest running -> end recorded", per_job, "s", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--chain", type=int, default=6)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/vmjobs-bench-queue"))
    parser.add_argument("--image-spool", type=Path,
                        default=Path(os.environ.get("VMJOBS_TEST_SPOOL",
                                                    "/var/tmp/vmjobs-daemon-spool")))
    args = parser.parse_args()
    if not (args.image_spool / "images").is_dir():
        raise SystemExit(f"no built image in {args.image_spool}: run 'vmjob image build' with a "
                         "config whose spool is there, or pass --image-spool")
    args.root.mkdir(parents=True, exist_ok=True)
    proc, sock = start_daemon(args.root, args.image_spool)
    try:
        throughput(sock, args.submits, args.clients)
        latency(sock, args.root / "spool", args.chain)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
