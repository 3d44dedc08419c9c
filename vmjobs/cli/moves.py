"""`vmjob migrate|checkpoint|restore|drain|uncordon|rebalance`: moving running jobs.

Each sends one request to the daemon and shows what it reports while it works: a progress bar
on a terminal (memory left, rate, downtime limit), one line a step otherwise; the final result
as a line per job, or as JSON with --json. A refusal is one line and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import click

from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.options import duration_value
from vmjobs.cli.output import json_option
from vmjobs.errors import UsageError, VmjobsError
from vmjobs.spec import MAX_CPUS
from vmjobs.units import parse_size_mib


class MoveFailed(VmjobsError):
    """At least one job did not move; it is where it was (the message says where). With
    --json the results, failures included, were printed already: no second object."""

    json_code = "move_failed"


def _bar(progress: dict[str, Any]) -> str:
    total = progress.get("memory_total") or 0
    left = progress.get("memory_remaining") or 0
    done = 1 - left / total if total else 0.0
    return (f"\r[{'#' * int(done * 24):<24}] {done:4.0%}  {left >> 20} MiB left  "
            f"{(progress.get('rate_bps') or 0) / (1 << 20):.0f} MiB/s  downtime limit "
            f"{progress.get('downtime_ms')} ms  {progress.get('elapsed_s', 0):.1f}s "
            f"{progress.get('phase', '')}   ")


def follow(lines: Iterator[dict[str, Any]], as_json: bool,
           plan: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Show progress and notes on stderr; return the results, or raise the error. The plan
    the daemon announces (rebalance) is put into `plan` when given."""
    tty = sys.stderr.isatty()
    drawn = False
    for line in lines:
        if "progress" in line:
            if tty:
                click.echo(_bar(line["progress"]), nl=False, err=True)
                drawn = True
            continue
        if drawn:
            click.echo("", err=True)
            drawn = False
        if "note" in line:
            click.echo(f"vmjob: {line['note']}", err=True)
        elif "plan" in line:
            if plan is not None:
                plan.update(line["plan"])
            if not as_json:
                click.echo(f"vmjob: plan: {line['plan']['summary']}", err=True)
        elif "error" in line:
            raise VmjobsError(str(line["error"]))
        elif "results" in line:
            return list(line["results"])
    raise VmjobsError("the daemon ended the answer without a result")


def report(results: list[dict[str, Any]], as_json: bool,
           shown: dict[str, Any] | None = None) -> None:
    """Print the results (with --json: `shown`, else the results list); raise MoveFailed
    if any job did not move."""
    if as_json:
        click.echo(json.dumps(results if shown is None else shown, indent=2))
    else:
        for r in results:
            where = " -> ".join(h for h in (r.get("from"), r.get("to")) if h)
            click.echo(f"{r['job']}: {r['action']}{' ' + where if where else ''}: "
                       f"{r['detail']}")
    failed = [r for r in results if r["action"] == "failed"]
    if failed:
        error = MoveFailed(f"{len(failed)} of {len(results)} job(s) did not move: "
                           + "; ".join(f"{r['job']}: {r['detail']}" for r in failed))
        error.json_reported = as_json  # the results above say it, failures included
        raise error


@click.command()
@click.argument("job")
@click.option("--to", default=None, metavar="HOST",
              help="Destination host (default: the placement engine chooses).")
@click.option("--max-downtime", type=click.IntRange(min=1), default=None, metavar="MS",
              help="Start with this downtime limit; raised in steps while the copy stalls "
                   "[default: 300].")
@click.option("--bandwidth", type=click.IntRange(min=1), default=None, metavar="MIB_S",
              help="Limit the migration's bandwidth.")
@click.option("--auto-converge", is_flag=True, help="Let QEMU throttle the guest's vCPUs "
              "when the copy does not converge.")
@click.option("--postcopy", is_flag=True, help="Switch to post-copy when the downtime limit "
              "is at its ceiling and the copy still stalls.")
@click.option("--timeout", default=None, metavar="DURATION",
              help="Abort after this long [default: 30s + 60s per GiB of guest memory].")
@click.option("--replug-nics", is_flag=True,
              help="Unplug the job's NICs, migrate, plug equivalent free NICs of the "
                   "destination in at the same guest addresses ($NIC0.. stay valid). Needed "
                   "for passthrough NICs, which cannot be migrated.")
@json_option
@url_option
def migrate(job: str, to: str | None, max_downtime: int | None, bandwidth: int | None,
            auto_converge: bool, postcopy: bool, timeout: str | None, replug_nics: bool,
            as_json: bool, url: str | None) -> None:
    """Live-migrate a running job to another host, re-pinned there.

    The destination is reserved first; the job's vCPUs and memory are pinned to the
    destination's own reservation. On any failure the job keeps running where it was.

    \b
    Examples:
      vmjob migrate 3f9a1c2e --to node2
      vmjob migrate 3f9a1c2e --max-downtime 500 --auto-converge --timeout 5m
      vmjob migrate 3f9a1c2e --to node2 --replug-nics
    """
    body = {"to": to, "max_downtime_ms": max_downtime, "bandwidth_mib_s": bandwidth,
            "auto_converge": auto_converge or None, "postcopy": postcopy or None,
            "timeout_s": duration_value(timeout, "--timeout"),
            "replug_nics": replug_nics or None}
    client = client_for(url)
    report(follow(client.job_action(job, "migrate", body), as_json), as_json)


@click.command()
@click.argument("job")
@click.option("--cpus", default=None, metavar="N", help="vCPUs the job should have now.")
@click.option("--mem", "memory", default=None, metavar="SIZE",
              help="Guest memory it should have now (512M, 1.5G; steps of 2 MiB).")
@json_option
@url_option
def resize(job: str, cpus: str | None, memory: str | None, as_json: bool,
           url: str | None) -> None:
    """Grow or shrink a running job in place: vCPU and memory hotplug.

    New vCPUs are pinned to free cpus of the job's own NUMA node, reserved before they are
    plugged; cores and memory a shrink gives up go back to the pool once the guest released
    them. The guest sees the change (nproc, MemTotal), which is printed. Only jobs started
    while the daemon's config had 'hotplug: true' can be resized, up to the cpus of their
    node and the memory the config allows.

    \b
    Examples:
      vmjob resize 3f9a1c2e --cpus 4
      vmjob resize 3f9a1c2e --cpus 1 --mem 512M --json
    """
    if cpus is None and memory is None:
        raise UsageError("give --cpus and/or --mem")
    body: dict[str, int] = {}
    if cpus is not None:
        if not cpus.isdigit() or not 1 <= int(cpus) <= MAX_CPUS:
            raise UsageError(f"--cpus must be a whole number from 1 to {MAX_CPUS}, not {cpus!r}")
        body["cpus"] = int(cpus)
    if memory is not None:
        try:
            body["memory_mib"] = parse_size_mib(memory, "--mem")
        except VmjobsError as exc:
            raise UsageError(str(exc)) from None
    client = client_for(url)
    report(follow(client.job_action(job, "resize", body), as_json), as_json)


@click.command()
@click.argument("job")
@json_option
@url_option
def checkpoint(job: str, as_json: bool, url: str | None) -> None:
    """Save a running job to disk and free its cores and memory.

    The job becomes CHECKPOINTED; `vmjob restore` continues it on any host. Cancelling a
    checkpointed job removes its checkpoint. With a gang's id, every member is paused, then
    saved: all are checkpointed, or (a save failed) all run on.

    \b
    Examples:
      vmjob checkpoint 3f9a1c2e && vmjob restore 3f9a1c2e --to node3
      vmjob checkpoint 5b21d07a          # a gang: every member
      vmjob checkpoint 5b21d07a.1        # one member; the others run on
    """
    client = client_for(url)
    report(follow(client.job_action(job, "checkpoint"), as_json), as_json)


@click.command()
@click.argument("job")
@click.option("--to", default=None, metavar="HOST[,HOST...]",
              help="Host to restore on (default: wherever the job's request fits); for a "
                   "gang, one host per member in index order.")
@json_option
@url_option
def restore(job: str, to: str | None, as_json: bool, url: str | None) -> None:
    """Continue a checkpointed job, placed again under its original request.

    With a gang's id every member is restored, or none: placed together (apart, as when it
    started), restored paused, then all resumed; its network and vmjob-ctl follow.

    \b
    Examples:
      vmjob restore 3f9a1c2e --to node3
      vmjob restore 5b21d07a --to node2,node3    # member 0 on node2, member 1 on node3
    """
    client = client_for(url)
    report(follow(client.job_action(job, "restore", {"to": to}), as_json), as_json)


@click.command()
@click.argument("host")
@click.option("--checkpoint-unmovable", is_flag=True,
              help="Checkpoint jobs that cannot be migrated anywhere (restored automatically "
                   "when they fit again); without it they stay and the command fails.")
@json_option
@url_option
def drain(host: str, checkpoint_unmovable: bool, as_json: bool, url: str | None) -> None:
    """Cordon a host and move every job off it (admins only).

    Nothing new is placed on a cordoned host until `vmjob uncordon HOST`.

    \b
    Example:
      vmjob drain node1 --checkpoint-unmovable
    """
    client = client_for(url)
    body = {"checkpoint_unmovable": checkpoint_unmovable}
    report(follow(client.host_action(host, "drain", body), as_json), as_json)


@click.command()
@click.argument("host")
@json_option
@url_option
def uncordon(host: str, as_json: bool, url: str | None) -> None:
    """Let a cordoned (drained) host take jobs again (admins only).

    With --json: {"host": HOST, "was_cordoned": true|false}.

    \b
    Example:
      vmjob uncordon node1
    """
    client = client_for(url)
    try:
        answer = client.call("POST", f"/v1/hosts/{quote(host, safe='')}/uncordon")
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"{host}: " + ("uncordoned" if answer["was_cordoned"] else "was not cordoned"))


@click.command()
@click.option("--dry-run", is_flag=True, help="Show the plan; move nothing.")
@click.option("--max-moves", type=click.IntRange(min=0), default=4, show_default=True,
              help="At most this many moves (migrations and re-pins).")
@click.option("--objective", type=click.Choice(["whole-nodes", "fragments"]),
              default="whole-nodes", show_default=True,
              help="whole-nodes: free whole NUMA nodes; fragments: lower the fragment rate "
                   "for jobs of --target-cpus.")
@click.option("--target-cpus", type=click.IntRange(min=1), default=16, show_default=True,
              help="Job size S of the fragment rate, Σ(free cpus mod S) / Σ free cpus.")
@json_option
@url_option
def rebalance(dry_run: bool, max_moves: int, objective: str, target_cpus: int, as_json: bool,
              url: str | None) -> None:
    """Move jobs so that whole NUMA nodes, or whole slots for jobs of a target size, become
    free (admins only). Moves inside a host re-pin the guest live.

    With --json, one shape with or without --dry-run: {"plan": {found, summary, cost_mib,
    actions, freed}, "results": [...]} ("results" is empty for a dry run).

    \b
    Examples:
      vmjob rebalance --dry-run
      vmjob rebalance --max-moves 2
      vmjob rebalance --objective fragments --target-cpus 16 --max-moves 25 --dry-run
    """
    client = client_for(url)
    body = {"dry_run": dry_run, "max_moves": max_moves, "objective": objective,
            "target_cpus": target_cpus}
    if dry_run:
        plan = client.call("POST", "/v1/rebalance", body)
        if as_json:
            click.echo(json.dumps({"plan": plan, "results": []}, indent=2))
            return
        click.echo(plan["summary"])
        for action in plan["actions"]:
            target = f" to {action['to']}" if action.get("to") else ""
            click.echo(f"  {action['action']} {action['job']}{target} "
                       f"({action['memory_mib']} MiB)")
        return
    plan_shown: dict[str, Any] = {}
    results = follow(client.progress("/v1/rebalance", body), as_json, plan_shown)
    report(results, as_json, {"plan": plan_shown, "results": results})
