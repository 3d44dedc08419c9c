"""What borrowing costs an owner: the owner's burn time with and without a borrower on its
idle core, real guests (TCG) through a real daemon on the local host's cpus 0-1.

    python bench/borrow.py [--rounds 2] [--iterations 300000] [--images DIR]

Each round runs, one after the other, (a) the baseline: a 2-cpu owner that idles (`sleep`),
then burns both vCPUs on a fixed amount of work (two shell loops of --iterations each), alone
on the host; (b) the same owner with a 1-cpu `--borrow` job submitted beside it, which the
daemon places on the owner's idle second core and moves off (checkpoints: the host has no
other free core) when the owner starts burning, restoring it once the owner ends. Figures per
round: the owner's burn time as the guest measured it (/proc/uptime before and after the
work), its ratio to the baseline of the same round, and the give-back as the borrower's
events record it (the note "giving back" to its CHECKPOINTED event). Figures, not a
pass/fail test: see docs/borrowing.md. Run under the guest lock; needs a built image in
--images (a test spool, e.g. $VMJOBS_TEST_SPOOL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/placement.py would shadow the placement package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import yaml  # noqa: E402

from vmjobs.client import Client  # noqa: E402
from vmjobs.errors import VmjobsError  # noqa: E402
from vmjobs.transport import Target  # noqa: E402

BORROW = {"idle_below": 0.1, "for": "2s", "give_back_within": "4s"}
IDLE_S = 35  # long enough for the borrower to be lent the core and boot on it


def owner_argv(iterations: int) -> list[str]:
    work = f"i=0; while [ $i -lt {iterations} ]; do i=$((i + 1)); done"
    return ["sh", "-c", f"echo owner-idle; sleep {IDLE_S}; echo owner-burn; "
            f"t0=$(cut -d' ' -f1 /proc/uptime); ({work}) & ({work}) & wait; "
            "t1=$(cut -d' ' -f1 /proc/uptime); echo burn $t0 $t1"]


BORROWER = ["sh", "-c", "i=0; while [ $i -lt 60 ]; do echo tick $i; i=$((i + 1)); sleep 1; "
            "done"]


def start_daemon(root: Path, images: Path) -> tuple[subprocess.Popen[bytes], Client, Path]:
    spool = root / "spool"
    spool.mkdir(mode=0o755, parents=True)
    root.chmod(0o755)
    for shared in ("images", "cache"):
        (spool / shared).symlink_to(images / shared)
    cpus = os.cpu_count() or 2
    host: dict[str, Any] = {"name": "local", "uri": "qemu:///system"}
    if cpus > 2:
        host["reserved_cpus"] = f"2-{cpus - 1}"
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "spool": str(spool), "virt_type": "qemu", "nic_backend": "emulated",
        "socket": str(spool / "vmjobs.sock"), "hosts": [host], "usage_sample_interval": 1,
        "usage_window": "5s", "borrow": BORROW}))
    log = (root / "daemon.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "vmjobs", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT)
    client = Client(Target(spool / "vmjobs.sock"))
    deadline = time.monotonic() + 60
    while True:
        try:
            client.status()
            return proc, client, config
        except VmjobsError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the daemon did not start; see {root / 'daemon.log'}") \
                    from None
            time.sleep(0.1)


def wait_ended(client: Client, job_id: str, timeout: float = 900) -> dict[str, Any]:
    view = client.call("GET", f"/v1/jobs/{job_id}/wait?timeout={timeout}", timeout=timeout + 10)
    if view["state"] != "COMPLETED":
        raise SystemExit(f"job {job_id} ended {view['state']}: {view.get('message')}")
    return client.job(job_id)


def burn_s(client: Client, job_id: str) -> float:
    line = next(ln for ln in "".join(client.logs(job_id)).splitlines() if ln.startswith("burn "))
    _, t0, t1 = line.split()
    return float(t1) - float(t0)


def one_run(client: Client, iterations: int, borrower: bool) -> dict[str, float | None]:
    owner = client.submit({"argv": owner_argv(iterations), "cpus": 2, "mem": "256M",
                           "time_limit": "900s"})["id"]
    other = client.submit({"argv": BORROWER, "cpus": 1, "mem": "128M", "borrow": True,
                           "time_limit": "900s"})["id"] if borrower else None
    o_view = wait_ended(client, owner)
    figures: dict[str, float | None] = {"burn_s": burn_s(client, owner), "give_back_s": None,
                                        "lent": 0.0}
    if other is not None:
        b_view = wait_ended(client, other)
        asked = [e["time"] for e in b_view["events"] if "giving back" in (e["reason"] or "")]
        saved = [e["time"] for e in b_view["events"] if e["state"] == "CHECKPOINTED"]
        figures["lent"] = 1.0 if any("lends" in (e["reason"] or "")
                                     for e in o_view["events"]) else 0.0
        if asked and saved:
            figures["give_back_s"] = saved[0] - asked[0]
    time.sleep(5)  # the guests' QEMU processes are gone before the next run starts
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300_000)
    parser.add_argument("--images", type=Path, default=Path(os.environ.get(
        "VMJOBS_TEST_SPOOL", "/var/tmp/vmjobs-daemon-spool")))
    args = parser.parse_args()
    if not (args.images / "images").is_dir():
        raise SystemExit(f"no built image under {args.images} (run a daemon test there first)")
    root = Path(tempfile.mkdtemp(prefix="vmjobs-bench-borrow-", dir="/var/tmp"))
    proc, client, _config = start_daemon(root, args.images)
    rows = []
    try:
        for round_ in range(1, args.rounds + 1):
            base = one_run(client, args.iterations, borrower=False)
            lent = one_run(client, args.iterations, borrower=True)
            rows.append((round_, base, lent))
            give = lent["give_back_s"]
            print(f"round {round_}: owner burn alone {base['burn_s']:.2f} s, with a borrower "
                  f"{lent['burn_s']:.2f} s (x{lent['burn_s'] / base['burn_s']:.2f}); "  # type: ignore[operator]
                  f"lent: {'yes' if lent['lent'] else 'no'}; give-back (asked -> checkpointed) "
                  f"{'-' if give is None else f'{give:.1f} s'}", flush=True)
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    ratios = [lent["burn_s"] / base["burn_s"] for _r, base, lent in rows]  # type: ignore[operator]
    print(f"owner's burn time with a borrower / alone: median x{statistics.median(ratios):.2f} "
          f"over {len(ratios)} rounds ({', '.join(f'x{r:.2f}' for r in ratios)})")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
