"""Rebalance benchmark: fragment rate before/after under a migration limit (MNL).

Snapshots shaped like VMR2L's (Guo et al., NSDI'24): hosts of 2 NUMA nodes x 44 cpus, about
80% of cpus used, VMs of 1/2/4/8/16/32 cpus weighted toward small ones; target size S = 16.
Compares, per MNL in 10/25/50/100:

- whole-nodes: the fragment rate the default objective leaves;
- ours: `plan_rebalance(objective="fragments")` (placement.fragments);
- greedy: one move at a time, any move that completes an S-cpu slot (the only single moves
  that lower the rate), least memory first, until none does;
- exact (small snapshots only): CP-SAT (OR-Tools, `pip install .[bench]`) maximising whole
  S-cpu slots under the same MNL and per-node cpu and memory capacities.

    python bench/rebalance.py [--small-hosts 6] [--hosts 300] [--seed 1] [--exact-s 20]

Prints one table; figures, not assertions.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from placement import Cluster, apply_plan, plan_rebalance  # noqa: E402
from placement.fragments import fragment_rate, move_to_node  # noqa: E402
from placement.plans import Action, Plan  # noqa: E402
from placement.sim import positive_count  # noqa: E402
from placement.snapshot import cluster_from_snapshot  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32)
WEIGHTS = (30, 25, 20, 13, 8, 4)  # toward small VMs, like VMR2L's mix
NODE_CPUS = 44
MIB_PER_CPU = 2048
S = 16


def generate(hosts: int, seed: int, used: float = 0.8) -> dict[str, Any]:
    """A snapshot: every node filled with random VMs up to a share of its cpus drawn from
    used ± 0.2 (so some nodes have whole S-cpu slots free and some none)."""
    rng = random.Random(seed)
    snapshot: dict[str, Any] = {"hosts": [], "jobs": []}
    n = 0
    for h in range(hosts):
        name = f"h{h:03d}"
        snapshot["hosts"].append({"name": name, "nodes": [
            {"id": i, "cpus": NODE_CPUS, "memory_mib": NODE_CPUS * MIB_PER_CPU}
            for i in range(2)]})
        for node in range(2):
            left = round(NODE_CPUS * min(1.0, rng.uniform(used - 0.2, used + 0.2)))
            while left > 0:
                size = rng.choices(SIZES, WEIGHTS)[0]
                if size > left:
                    size = max(s for s in SIZES if s <= left)
                snapshot["jobs"].append({"id": f"vm{n}", "host": name, "nodes": [
                    {"node": node, "cpus": size, "memory_mib": size * MIB_PER_CPU}]})
                left -= size
                n += 1
    return snapshot


def greedy(cluster: Cluster, max_moves: int) -> Plan:
    """One move at a time: a job whose leaving completes a slot on its node, into another
    node's remainder (tightest first); least memory first; stop when none exists."""
    work = cluster.copy()
    actions: list[Action] = []
    while len(actions) < max_moves:
        free = {(h, n.shape.id): len(n.free) for h in work.hosts
                for n in work._ledger(h).nodes}
        moves = []
        for job_id, alloc in work.allocations().items():
            src = (alloc.host, alloc.nodes[0].node)
            cpus = len(alloc.cpus)
            if free[src] % S + cpus >= S:
                moves.append((alloc.memory_mib, job_id, src, cpus))
        done = None
        for _, job_id, src, cpus in sorted(moves):
            spots = sorted((f % S, k) for k, f in free.items() if k != src and f % S >= cpus)
            for _, (host, node) in spots:
                done = move_to_node(work, job_id, host, node)
                if done is not None:
                    break
            if done is not None:
                break
        if done is None:
            break
        actions.append(done)
    return Plan(bool(actions), tuple(actions), sum(a.memory_mib for a in actions), "greedy")


def exact(snapshot: dict[str, Any], max_moves: int, seconds: float) -> tuple[float, bool]:
    """CP-SAT: maximise Σ whole S-cpu slots over nodes with at most `max_moves` jobs off their
    node. Returns (fragment rate after, proven optimal)."""
    from ortools.sat.python import cp_model

    nodes = [(h["name"], n["id"], n["cpus"], n["memory_mib"])
             for h in snapshot["hosts"] for n in h["nodes"]]
    index = {(h, i): k for k, (h, i, _, _) in enumerate(nodes)}
    jobs = [(j["id"], index[(j["host"], j["nodes"][0]["node"])], j["nodes"][0]["cpus"],
             j["nodes"][0]["memory_mib"]) for j in snapshot["jobs"]]
    model = cp_model.CpModel()
    x = {(j, k): model.NewBoolVar(f"x{j}_{k}") for j in range(len(jobs))
         for k in range(len(nodes))}
    for j in range(len(jobs)):
        model.AddExactlyOne(x[j, k] for k in range(len(nodes)))
    slots = []
    for k, (_, _, cpus, memory) in enumerate(nodes):
        used = sum(jobs[j][2] * x[j, k] for j in range(len(jobs)))
        model.Add(sum(jobs[j][3] * x[j, k] for j in range(len(jobs))) <= memory)
        z = model.NewIntVar(0, cpus // S, f"z{k}")
        model.Add(used + S * z <= cpus)
        slots.append(z)
    model.Add(sum(1 - x[j, jobs[j][1]] for j in range(len(jobs))) <= max_moves)
    model.Maximize(sum(slots))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 2
    status = solver.Solve(model)
    free = [cpus - sum(jobs[j][2] for j in range(len(jobs)) if solver.Value(x[j, k]))
            for k, (_, _, cpus, _) in enumerate(nodes)]
    rate = sum(f % S for f in free) / sum(free)
    return rate, status == cp_model.OPTIMAL


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def row(label: str, snapshot: dict[str, Any], with_exact: bool, seconds: float) -> None:
    cluster = cluster_from_snapshot(snapshot)
    before = fragment_rate(cluster, S)
    for mnl in (10, 25, 50, 100):
        ours, t_ours = timed(lambda c, m: plan_rebalance(c, m, objective="fragments",
                                                          target_cpus=S, time_budget_s=None),
                             cluster, mnl)
        base, t_base = timed(greedy, cluster, mnl)
        nodes = plan_rebalance(cluster, mnl, time_budget_s=None)  # the whole-nodes objective
        cells = [label, f"{mnl:>4}", f"{before:.3f}",
                 f"{fragment_rate(apply_plan(cluster, nodes), S):.3f}",
                 f"{fragment_rate(apply_plan(cluster, ours), S):.3f}",
                 f"{len(ours.actions):>3}", f"{t_ours:6.3f}",
                 f"{fragment_rate(apply_plan(cluster, base), S):.3f}",
                 f"{len(base.actions):>3}", f"{t_base:6.3f}"]
        if with_exact:
            (rate, optimal), t_exact = timed(exact, snapshot, mnl, seconds)
            cells += [f"{rate:.3f}{'' if optimal else '*'}", f"{t_exact:6.2f}"]
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-hosts", type=positive_count, default=6,
                        help="hosts of the three small snapshots, solved exactly too (default 6)")
    parser.add_argument("--hosts", type=positive_count, default=300,
                        help="hosts of the large snapshot, ours vs greedy only (default 300)")
    parser.add_argument("--seed", type=int, default=1,
                        help="first seed; the small snapshots use it and the next two (default 1)")
    parser.add_argument("--exact-s", type=float, default=20.0,
                        help="CP-SAT time limit per solve (default 20); '*' marks a solve not "
                             "proven optimal")
    args = parser.parse_args(argv)
    print("snapshot | MNL | before | whole-nodes | ours | moves | s | greedy | moves | s | "
          "exact | s")
    for seed in range(args.seed, args.seed + 3):
        small = generate(args.small_hosts, seed)
        row(f"{args.small_hosts} hosts seed {seed}", small, True, args.exact_s)
    large = generate(args.hosts, args.seed)
    row(f"{args.hosts} hosts seed {args.seed}", large, False, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
