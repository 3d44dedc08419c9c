"""Placement benchmark: placements per second and latency at 1000 hosts, plan_to_fit at 200.

    python bench/placement.py [--hosts 1000] [--jobs 20000] [--ops 5000] [--plan-hosts 200]
                              [--plans 100] [--seed 1]

Part 1 fills `--hosts` hosts of 2 NUMA nodes x 32 cores (128 GiB per node) with `--jobs` live
allocations (1-8 vCPUs, numa strict / prefer / any) and then runs `--ops` steady-state
operations: release a random job, `place` a new random request with `pack`, `reserve` it. It
prints placements per second and p50 / p99 latency of place + reserve (and of place alone).

Part 2 builds a fragmented `--plan-hosts` cluster (no node has 24 free cores) and times
`plan_to_fit` for `--plans` requests that do not fit as things stand, with its default time
budget; it prints p50 / p95 latency and how many plans were found and complete.

Figures, not assertions: pure Python on a shared machine, so run it more than once and read
the load (`uptime`). Targets from issue 3 are printed beside the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from placement import Allocation, Cluster, NodeShare, NumaPolicy, Request  # noqa: E402
from placement.plans import plan_to_fit  # noqa: E402
from placement.synthetic import make_hosts  # noqa: E402

GIB = 1024
PLACEMENTS_PER_S = 2000
P99_MS = 5.0
PLAN_P95_MS = 50.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))]


def random_request(rng: random.Random) -> Request:
    cpus = rng.choice((1, 1, 2, 2, 2, 4, 4, 8))
    numa = rng.choice((NumaPolicy.STRICT, NumaPolicy.STRICT, NumaPolicy.PREFER, NumaPolicy.ANY))
    return Request(cpus=cpus, memory_mib=cpus * rng.choice((1, 2, 4)) * GIB, numa=numa)


def fill(cluster: Cluster, jobs: int, rng: random.Random) -> list[str]:
    live = []
    for i in range(jobs):
        request = random_request(rng)
        alloc = cluster.place(request, "pack").allocation
        if alloc is None:
            break
        cluster.reserve(f"j{i}", alloc, request)
        live.append(f"j{i}")
    return live


def bench_placements(hosts: int, jobs: int, ops: int, seed: int) -> None:
    rng = random.Random(seed)
    started = time.perf_counter()
    cluster = Cluster(make_hosts(hosts, nodes=2, cores=32, memory_mib=128 * GIB))
    live = fill(cluster, jobs, rng)
    free = sum(cluster.free(h).cpus_free for h in cluster.hosts)
    print(f"cluster: {hosts} hosts x 2 nodes x 32 cores; {len(live)} live allocations, "
          f"{free} of {hosts * 64} cpus free (built in {time.perf_counter() - started:.1f} s)")
    both: list[float] = []
    place_only: list[float] = []
    failed = 0
    gc.collect()
    began = time.perf_counter()
    for k in range(ops):
        victim = live.pop(rng.randrange(len(live)))
        cluster.release(victim)
        request = random_request(rng)
        t0 = time.perf_counter()
        decision = cluster.place(request, "pack")
        t1 = time.perf_counter()
        if decision.allocation is None:
            failed += 1
            continue
        job = f"s{k}"
        cluster.reserve(job, decision.allocation, request)
        t2 = time.perf_counter()
        live.append(job)
        place_only.append(t1 - t0)
        both.append(t2 - t0)
    wall = time.perf_counter() - began
    rate = len(both) / sum(both)
    p99 = percentile(both, 0.99) * 1000
    print(f"placements: {len(both)} placed, {failed} did not fit, {wall:.1f} s wall "
          f"(release and bookkeeping included)")
    print(f"  place+reserve: {rate:,.0f} placements/s (target >= {PLACEMENTS_PER_S:,}), "
          f"p50 {percentile(both, 0.5) * 1000:.2f} ms, p99 {p99:.2f} ms "
          f"(target < {P99_MS:.0f} ms)")
    print(f"  place alone:   p50 {percentile(place_only, 0.5) * 1000:.2f} ms, "
          f"p99 {percentile(place_only, 0.99) * 1000:.2f} ms")


def fragmented(hosts: int, rng: random.Random) -> Cluster:
    """Every node left with 4 to 20 free cores, scattered: a 24-core strict job fits nowhere."""
    cluster = Cluster(make_hosts(hosts, nodes=2, cores=32, memory_mib=128 * GIB))
    k = 0
    for host in cluster.hosts:
        for node in (0, 1):
            target = rng.randrange(12, 29)  # cores to hold on this node
            held = 0
            while held < target:
                cpus = min(rng.choice((1, 2, 2, 4, 4, 8)), target - held)
                ids = tuple(range(node * 32 + held, node * 32 + held + cpus))
                memory = cpus * 2 * GIB
                alloc = Allocation(host, ids, memory, (NodeShare(node, ids, memory),))
                cluster.reserve(f"f{k}", alloc, Request(cpus, memory, numa=NumaPolicy.STRICT))
                k += 1
                held += cpus
    return cluster


def bench_plans(hosts: int, plans: int, seed: int) -> None:
    rng = random.Random(seed)
    cluster = fragmented(hosts, rng)
    print(f"plan_to_fit: {hosts} hosts x 2 nodes x 32 cores, "
          f"{len(cluster.allocations())} live allocations, fragmented")
    latencies: list[float] = []
    found = complete = 0
    for _ in range(plans):
        cpus = rng.randrange(24, 33)
        request = Request(cpus, cpus * 2 * GIB, numa=NumaPolicy.STRICT)
        assert not cluster.place(request).fits
        t0 = time.perf_counter()
        plan = plan_to_fit(cluster, request)
        latencies.append(time.perf_counter() - t0)
        found += plan.found
        complete += plan.complete
    p95 = percentile(latencies, 0.95) * 1000
    print(f"  {plans} requests of 24-32 cores strict: p50 "
          f"{percentile(latencies, 0.5) * 1000:.1f} ms, p95 {p95:.1f} ms "
          f"(target < {PLAN_P95_MS:.0f} ms), max {max(latencies) * 1000:.1f} ms; "
          f"{found} plans found, {complete} searches finished within the budget")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--plan-hosts", type=int, default=200)
    parser.add_argument("--plans", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus")
    bench_placements(args.hosts, args.jobs, args.ops, args.seed)
    bench_plans(args.plan_hosts, args.plans, args.seed)


if __name__ == "__main__":
    main()
