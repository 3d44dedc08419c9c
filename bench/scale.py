"""Scale benchmark: the real daemon (its API over its socket, store and scheduler) at
thousands of hosts and tens of thousands of jobs.

    python bench/scale.py --hosts N --jobs M [--submits S] [--clients C] [--placements P]
                          [--lists L] [--root DIR] [--image-spool DIR] [--compare CODE]

Hosts are libvirt's test driver, one `test:///<root>/hosts/<name>.xml` per host (a custom
node of 2 sockets x 32 cores, 256 GiB): the daemon connects to each, reads its inventory and
watches it as it does any libvirtd; nothing of libvirt is imitated. libvirt's test driver
reports no NUMA cells for a custom node, so the engine sees each host as one node of 64
cpus (the NUMA search itself is measured by bench/placement.py).

M jobs hold cores before the daemon starts, written into the store by this process as
direct runs (a `vmjob run` without a daemon records its own process the same way): the
daemon counts them as holdings and leaves them alone while this process lives, so they
never boot a guest. Round-robin over the hosts, 1-3 cpus and 1 GiB each, half with a time
limit. Then, through the daemon's unix socket:

1. start: from `vmjob serve` to /v1/status answering (N connections, recovery, the cluster
   model built);
2. placement: P times, one 1-vCPU job submitted (as root) to a cluster with room, waited
   for until placed; prints the daemon's own time for the passes that started one job
   (/v1/status `recent_passes`, p50/p99) and submit -> PLACED from the job's events. The job
   then starts on its test-driver host (or fails to; either way after the pass);
3. submits: every host cordoned (written into the store by this process, as another
   `vmjob` process would; the daemon sees it through the store's change log), C client
   processes under uid 60001 submit S jobs that queue: submits/s;
4. list: a client under uid 60002 submits 200 jobs, then lists its jobs L times (what
   `vmjob list` asks): p50/p99 with 200 queued.

`--compare CODE` runs everything twice, first with the vmjobs package found in CODE (e.g. a
checkout of main: `--compare /work/main`) and then with this tree, and prints both with
ratios. Figures, not assertions. Needs root (to change uid for the clients) and a built
image (--image-spool; the daemon needs one to accept a submit).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

CODE = Path(os.environ.get("VMJOBS_CODE", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(CODE))

from placement import Allocation, NodeShare, Request  # noqa: E402
from vmjobs.client import Client  # noqa: E402
from vmjobs.errors import VmjobsError  # noqa: E402
from vmjobs.jobs import JobRecord, JobState  # noqa: E402
from vmjobs.runner import _runner_identity  # noqa: E402
from vmjobs.store import Store  # noqa: E402
from vmjobs.transport import Target  # noqa: E402

CPUS = 64  # per host: 2 sockets x 32 cores
NODE_XML = """<node>
  <cpu><mhz>2100</mhz><model>x86_64</model><nodes>2</nodes><sockets>1</sockets>
    <cores>32</cores><threads>1</threads><active>64</active></cpu>
  <memory>268435456</memory>
</node>
"""
LOAD_UID = 4242  # owner of the jobs written before the daemon starts
SUBMIT_UID = 60001
LIST_UID = 60002
LISTED = 200


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"p50 {percentile(values, 0.5) * 1000:9.2f} ms  p99 "
            f"{percentile(values, 0.99) * 1000:9.2f} ms  (n={len(values)})")


# --- setting up -------------------------------------------------------------------------------

def make_hosts(root: Path, count: int) -> list[dict[str, str]]:
    folder = root / "hosts"
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(count - 1))
    hosts = []
    for i in range(count):
        name = f"h{i:0{width}d}"
        path = folder / f"{name}.xml"
        path.write_text(NODE_XML)
        hosts.append({"name": name, "uri": f"test://{path}"})
    return hosts


def write_config(root: Path, hosts: list[dict[str, str]], image_spool: Path) -> Path:
    spool = root / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    for shared in ("images", "cache"):
        if (image_spool / shared).exists():
            (spool / shared).symlink_to(image_spool.resolve() / shared)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "spool": str(spool), "virt_type": "qemu", "socket": str(root / "vmjobs.sock"),
        "hosts": hosts, "max_connections_per_user": 64,
    }))
    return config


def prefill(spool: Path, hosts: list[dict[str, str]], jobs: int) -> None:
    """`jobs` holdings, round-robin over the hosts, as direct runs of this process."""
    used = [0] * len(hosts)
    runner = _runner_identity()
    store = Store(spool / "state.db")
    with store.reserving():
        for k in range(jobs):
            i = k % len(hosts)
            cpus = 1 + k % 3
            if used[i] + cpus > CPUS:
                raise SystemExit(f"{jobs} jobs do not fit {len(hosts)} hosts of {CPUS} cpus")
            ids = tuple(range(used[i], used[i] + cpus))
            used[i] += cpus
            alloc = Allocation(host=hosts[i]["name"], cpus=ids, memory_mib=1024,
                               nodes=(NodeShare(node=0, cpus=ids, memory_mib=1024),))
            spec = {"argv": ["sleep", "inf"], "env": {}, "image": "load",
                    "time_limit": 3600.0 if k % 2 else None, "runner": runner}
            record = JobRecord(id=f"load{k:06d}", owner="load", uid=LOAD_UID,
                               state=JobState.PLACED, spec=spec)
            store.add_job(record, Request(cpus=cpus, memory_mib=1024), alloc, "bench load")
    store.close()


def start_daemon(root: Path, config: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = dict(os.environ, PYTHONPATH=str(CODE))
    log = (root / "daemon.log").open("wb")
    began = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-m", "vmjobs", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    client = Client(Target(root / "vmjobs.sock"))
    while time.perf_counter() - began < 1800:
        try:
            client.status()
            return proc, time.perf_counter() - began
        except VmjobsError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    raise SystemExit(f"daemon did not start; see {root / 'daemon.log'}")


# --- the phases -----------------------------------------------------------------------------

def placements(sock: Path, count: int) -> dict[str, Any]:
    client = Client(Target(sock))
    latencies = []
    before = client.status()["scheduler"].get("passes")
    for _ in range(count):
        job_id = client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})["id"]
        deadline = time.monotonic() + 600
        while True:
            view = client.job(job_id)
            placed = [e["time"] for e in view["events"] if e["state"] == "PLACED"]
            if placed:
                latencies.append(placed[0] - view["events"][0]["time"])
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} not placed after 600 s")
            time.sleep(0.002)
    passes = [t for t, started in recent_passes(client, before) if started == 1]
    client.close()
    return {"pass_one_start_s": passes, "submit_to_placed_s": latencies}


def as_user(uid: int, work: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start `work(*args)` in a forked child under `uid` (the daemon tells callers apart by
    SO_PEERCRED); returns a function that waits for its result, sent back through a pipe."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        send.send(work(*args))

    proc = context.Process(target=child)
    proc.start()

    def result() -> Any:
        value = receive.recv()
        proc.join()
        return value

    return result


def submit_many(sock: str, count: int) -> list[str]:
    client = Client(Target(Path(sock)))
    ids = [client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})["id"]
           for _ in range(count)]
    client.close()
    return ids


def recent_passes(client: Client, since: int | None) -> list[list[float]]:
    """The daemon's passes after the `since`-th: [seconds, jobs started] each."""
    status = client.status()["scheduler"]
    if since is None or "recent_passes" not in status:
        return []
    return [[t / 1000, n] for t, n in status["recent_passes"][-(status["passes"] - since):]]


def submits(sock: Path, count: int, clients: int) -> dict[str, Any]:
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    client = Client(Target(sock))
    before = client.status()["scheduler"].get("passes")
    began = time.perf_counter()
    waits = [as_user(SUBMIT_UID, submit_many, str(sock), n) for n in shares]
    done = [wait() for wait in waits]
    took = time.perf_counter() - began
    passes = [t for t, _n in recent_passes(client, before)]
    client.close()
    return {"submits": sum(len(d) for d in done), "submit_s": took, "submit_passes_s": passes}


def list_many(sock: str, count: int) -> list[float]:
    client = Client(Target(Path(sock)))
    for _ in range(LISTED):
        client.submit({"argv": ["true"], "cpus": 1, "mem": "256M"})
    times = []
    for _ in range(count):
        began = time.perf_counter()
        views = client.jobs()
        times.append(time.perf_counter() - began)
        assert sum(1 for v in views if v["state"] == "QUEUED") == LISTED, len(views)
    client.close()
    return times


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    root = args.root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)  # the clients under other uids reach the socket through it
    hosts = make_hosts(root, args.hosts)
    config = write_config(root, hosts, args.image_spool)
    began = time.perf_counter()
    prefill(root / "spool", hosts, args.jobs)
    result: dict[str, Any] = {"code": str(CODE), "hosts": args.hosts, "jobs": args.jobs,
                              "prefill_s": time.perf_counter() - began}
    proc, result["start_s"] = start_daemon(root, config)
    sock = root / "vmjobs.sock"
    try:
        result.update(placements(sock, args.placements))
        store = Store(root / "spool" / "state.db")
        for host in hosts:  # nothing more can start: every submit below queues
            store.cordon(host["name"], "bench: full")
        store.close()
        result.update(submits(sock, args.submits, args.clients))
        result["list_s"] = as_user(LIST_UID, list_many, str(sock), args.lists)()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(root / "spool" / "jobs", ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> None:
    print(f"code: {result['code']}  ({result['hosts']} hosts x {CPUS} cpus, "
          f"{result['jobs']} jobs held)")
    print(f"  store prefill                 {result['prefill_s']:8.1f} s")
    print(f"  daemon start to answering     {result['start_s']:8.1f} s")
    print(f"  pass that starts one job      {ms(result['pass_one_start_s'])}")
    print(f"  submit -> PLACED (events)     {ms(result['submit_to_placed_s'])}")
    rate = result["submits"] / result["submit_s"]
    print(f"  submits through the API       {rate:8.1f} /s  ({result['submits']} by "
          f"the clients in {result['submit_s']:.1f} s, all queued)")
    print(f"  passes while they queued      {ms(result['submit_passes_s'])}  max "
          f"{max(result['submit_passes_s'], default=0) * 1000:.0f} ms")
    print(f"  list, {LISTED} queued               {ms(result['list_s'])}")


def ratio(before: list[float] | float, after: list[float] | float) -> str:
    b = percentile(before, 0.5) if isinstance(before, list) else before
    a = percentile(after, 0.5) if isinstance(after, list) else after
    return f"{b / a:8.1f}x" if a and b else "     n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--submits", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--placements", type=int, default=50)
    parser.add_argument("--lists", type=int, default=30)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/vmjobs-bench-scale"))
    parser.add_argument("--image-spool", type=Path,
                        default=Path(os.environ.get("VMJOBS_TEST_SPOOL",
                                                    "/var/tmp/vmjobs-test-spool")))
    parser.add_argument("--compare", type=Path, metavar="CODE",
                        help="also run with the vmjobs in CODE (e.g. a main checkout), first")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.exit(2, "bench/scale.py: needs root (clients run under other uids)\n")
    if not (args.image_spool / "images").is_dir():
        parser.exit(2, f"bench/scale.py: no built image in {args.image_spool}; pass "
                       "--image-spool\n")
    if args.compare is None:
        result = run_once(args)
        print(json.dumps(result)) if args.json else report(result)
        return
    results = []
    for code in (args.compare.resolve(), CODE):
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--compare")
        del argv[i:i + 2]
        out = subprocess.run([sys.executable, __file__, *argv, "--json"], check=True,
                             env=dict(os.environ, VMJOBS_CODE=str(code)),
                             stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        report(results[-1])
    before, after = results
    print(f"ratios, {before['code']} / {after['code']} (median; > 1: faster now):")
    print(f"  daemon start                  {ratio(before['start_s'], after['start_s'])}")
    print(f"  submit -> PLACED              "
          f"{ratio(before['submit_to_placed_s'], after['submit_to_placed_s'])}")
    print(f"  submits/s                     "
          f"{ratio(after['submits'] / after['submit_s'], before['submits'] / before['submit_s'])}")
    print(f"  list, {LISTED} queued               {ratio(before['list_s'], after['list_s'])}")


if __name__ == "__main__":
    main()
