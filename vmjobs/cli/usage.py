"""`vmjob usage`: the lab's load average per host or NUMA node, and per-user accounting.

Asks the daemon (`GET /v1/usage`); when none answers on the config's socket, computes the
same figures from the store directly (read only; the store is root's, so that is for root).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from vmjobs import usage
from vmjobs.cli.jobs import client_for, url_option
from vmjobs.client import NoDaemon
from vmjobs.errors import VmjobsError
from vmjobs.units import parse_duration


def _since(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        seconds = parse_duration(value, "--since")
    except VmjobsError as exc:
        raise click.BadParameter(str(exc).removeprefix("invalid --since ")) from None
    if not 1 <= seconds <= usage.MAX_SINCE_S:
        raise click.BadParameter(f"{value!r}: must be from 1s to 366d")
    return seconds


@click.command("usage")
@click.option("--by", type=click.Choice(usage.GROUPINGS), default="host", show_default=True,
              help="Group by host, NUMA node, pool, hardware profile or user.")
@click.option("--since", "since_s", default="24h", callback=_since, metavar="DURATION",
              show_default=True,
              help="How far back to look: per-user figures cover this period; load "
                   "windows longer than it show '-'.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@url_option
def usage_command(by: str, since_s: float, as_json: bool, url: str | None) -> None:
    """How busy the hosts have been, and who used them.

    \b
    --by host|node|pool: cores held by jobs / usable cores (the config's reserved_cpus
    excluded), averaged over the last 1 min, 1 h and 24 h -- the lab's "load average".
    --by profile: the same for jobs started with --profile, over the cores of the hosts
    the profile can use, and FREE: the share of each window during which one more job of
    the profile could have started (replayed exactly from the events; docs/user-guide.md).
    --by user: jobs that held cores, core-hours, and the queue wait (submit -> start) of
    the jobs that started, mean and 95th percentile, like Slurm's sreport/sacct.
    Figures come from the store's job events: they survive daemon restarts and include
    direct 'vmjob run's. Anyone sees host and node figures; per-user rows are your own
    unless you are an admin.

    \b
    Examples:
      vmjob usage
      vmjob usage --by node --json
      vmjob usage --by user --since 7d
      vmjob usage --by profile --json
    """
    data = _fetch(by, since_s, url)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in format_report(data):
        click.echo(line)


def _fetch(by: str, since_s: float, url: str | None) -> dict[str, Any]:
    client = client_for(url)
    try:
        return client.usage(by, since_s)
    except NoDaemon:
        if url:
            raise
    finally:
        client.close()
    return _from_store(by, since_s)


def _from_store(by: str, since_s: float) -> dict[str, Any]:
    """No daemon: the same report from the store and the hosts' libvirt inventory."""
    from vmjobs.hosts_view import live_cluster
    from vmjobs.store import Store

    config = click.get_current_context().obj.config
    now = time.time()
    store = Store(config.state_db)
    try:
        histories = store.usage_histories(now - since_s)
    finally:
        store.close()
    if by == "user":
        return usage.report(histories, {}, now, now - since_s, by)
    from vmjobs.profiles import usage_context

    cluster, _reached = live_cluster(config)
    capacity = usage.capacity_of(cluster.free(name) for name in cluster.hosts)
    return usage.report(histories, capacity, now, now - since_s, by,
                        **usage_context(config, cluster))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def format_report(data: dict[str, Any]) -> list[str]:
    """The report as a table, one line a row."""
    labels = list(data["windows"])
    if data["by"] == "user":
        table = [("USER", "JOBS", "CORE-HOURS", "STARTED", "WAIT MEAN", "WAIT P95")]
        table += [(r["user"], str(r["jobs"]), f"{r['core_hours']:.2f}", str(r["started"]),
                   _secs(r["wait_mean_s"]), _secs(r["wait_p95_s"])) for r in data["rows"]]
    elif data["by"] in ("pool", "profile"):
        by = data["by"]
        table = [(by.upper(), "HELD/USABLE", "JOBS", *(f"LOAD {label}" for label in labels),
                  *((f"FREE {label}" for label in labels) if by == "profile" else ()))]
        for r in data["rows"]:
            usable = "?" if r["usable_cores"] is None else str(r["usable_cores"])
            free = [_pct((r["could_start"] or {}).get(label)) for label in labels] \
                if by == "profile" else []
            table.append((r[by], f"{r['held_now']}/{usable}", str(r["jobs"]),
                          *(_pct(r["load"][label]) for label in labels), *free))
    else:
        head = "HOST" if data["by"] == "host" else "HOST/NODE"
        table = [(head, "HELD/USABLE", *(f"LOAD {label}" for label in labels))]
        for r in data["rows"]:
            name = r["host"] if r["node"] is None else f"{r['host']}/node{r['node']}"
            usable = "?" if r["usable_cores"] is None else str(r["usable_cores"])
            table.append((name, f"{r['held_now']}/{usable}",
                          *(_pct(r["load"][label]) for label in labels)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table]
