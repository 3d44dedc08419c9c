"""`vmjob plan`: rebalance plans worked out offline on a saved cluster snapshot, and the
snapshot of the live cluster to plan on (no daemon; `plan rebalance` needs no libvirt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from placement import Migrate, Plan, Repin, apply_plan, plan_rebalance
from placement.fragments import objective_value
from placement.plans import Objective
from placement.snapshot import SnapshotError, cluster_from_snapshot, snapshot_of
from vmjobs.cli.output import json_option
from vmjobs.hosts_view import live_cluster

OBJECTIVES = click.Choice([o.value for o in Objective])


@click.group()
def plan() -> None:
    """Plan moves offline, on a snapshot of the cluster.

    \b
    Examples:
      vmjob plan snapshot > cluster.json
      vmjob plan rebalance --snapshot cluster.json --max-moves 50 \\
          --objective fragments --target-cpus 16 --json
    """


def moves_of(plan_: Plan, hosts_before: dict[str, str]) -> list[dict[str, Any]]:
    """The plan's moves as `{"job", "from_host", "to_host", "to_nodes"}` (the snapshot
    format's output; `hosts_before`: job -> host it ran on)."""
    moves = []
    for action in plan_.actions:
        if isinstance(action, Migrate | Repin) and action.allocation is not None:
            moves.append({"job": action.job_id, "from_host": hosts_before[action.job_id],
                          "to_host": action.allocation.host,
                          "to_nodes": [{"node": s.node, "cpus": len(s.cpus),
                                        "memory_mib": s.memory_mib}
                                       for s in action.allocation.nodes]})
    return moves


@plan.command("rebalance")
@click.option("--snapshot", "path", required=True,
              type=click.Path(exists=True, dir_okay=False, readable=True),
              help="Cluster snapshot (JSON; see docs/placement.md).")
@click.option("--max-moves", type=click.IntRange(min=0), default=4, show_default=True,
              help="Migration limit: at most this many moves (re-pins and migrations).")
@click.option("--objective", type=OBJECTIVES, default="whole-nodes", show_default=True,
              help="whole-nodes: free whole NUMA nodes; fragments: lower the fragment rate.")
@click.option("--target-cpus", type=click.IntRange(min=1), default=16, show_default=True,
              help="Job size S the fragment rate is measured for.")
@json_option
def rebalance(path: str, max_moves: int, objective: str, target_cpus: int,
              as_json: bool) -> None:
    """Plan a rebalance of a saved snapshot; print the moves and the objective before/after.

    The fragment rate is Σ over NUMA nodes (free cpus mod S) / Σ free cpus (VMR2L, NSDI'24);
    lower is better. Nothing is moved.

    \b
    Examples:
      vmjob plan rebalance --snapshot cluster.json --max-moves 10
      vmjob plan rebalance --snapshot cluster.json --max-moves 50 \\
          --objective fragments --target-cpus 16 --json
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"{path} is not JSON: {exc}") from None
    try:
        cluster = cluster_from_snapshot(data)
    except SnapshotError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    planned = plan_rebalance(cluster, max_moves, objective=objective, target_cpus=target_cpus,
                             time_budget_s=None)
    hosts_before = {j: a.host for j, a in cluster.allocations().items()}
    before = objective_value(cluster, objective, target_cpus)
    after = objective_value(apply_plan(cluster, planned), objective, target_cpus)
    moves = moves_of(planned, hosts_before)
    if as_json:
        click.echo(json.dumps({"objective": objective, "target_cpus": target_cpus,
                               "moves": moves, "before": before, "after": after}, indent=2))
        return
    what = (f"fragment rate for {target_cpus}-cpu jobs" if objective == "fragments"
            else "whole free NUMA nodes")
    # A count of whole nodes reads as one ("0 -> 2"), a rate with three decimals.
    figure = "{:.3f}" if objective == "fragments" else "{:.0f}"
    click.echo(f"{what}: {figure.format(before)} -> {figure.format(after)} "
               f"with {len(moves)} move(s)")
    for move in moves:
        nodes = ",".join(str(n["node"]) for n in move["to_nodes"])
        click.echo(f"  {move['job']}: {move['from_host']} -> {move['to_host']} node {nodes}")


@plan.command("snapshot")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write here instead of stdout.")
@json_option
@click.pass_obj
def snapshot_command(obj: Any, output: str | None, as_json: bool) -> None:
    """Write the live cluster (hosts from libvirt, reservations from the store) as a snapshot.

    The snapshot is JSON with or without --json (which makes a refusal JSON too).

    Unreachable and cordoned hosts are left out. Jobs the live planner would not move (their
    request names the host, or they hold hugepages or NICs) are marked "movable": false, so an
    offline plan leaves them where they are too.

    \b
    Examples:
      vmjob plan snapshot > cluster.json
      vmjob plan snapshot -o cluster.json
    """
    cluster, _reached = live_cluster(obj.config)
    text = json.dumps(snapshot_of(cluster), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
