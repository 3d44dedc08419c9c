"""`vmjob pools [NAME]`: each pool's members, who holds what in it, and its line of jobs.

Asks the daemon (`GET /v1/pools`); when none answers on the config's socket, shows the same
from the store and the hosts' libvirt inventory (read only; no queue positions then: nobody
schedules without a daemon).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.output import json_option
from vmjobs.client import NoDaemon
from vmjobs.errors import NotFound
from vmjobs.units import format_clock, format_mib


@click.command("pools")
@click.argument("name", required=False)
@json_option
@url_option
def pools(name: str | None, as_json: bool, url: str | None) -> None:
    """Show the pools: members, free/total cores, holders and the queue.

    A pool is a named set of hosts (config: `pool: ci` or `pool: [ci, lab]` per host; a
    host in two pools counts in both). A job given `--pool NAME` waits in that pool's line,
    first come first served within its priority, and takes the first member that can serve
    it. For each pool this prints every member with its free/total cores, memory and NICs,
    every current holder (job, migration or reservation: who, since when, until when) and
    the jobs waiting in its line with their positions and the reason they wait. An unknown
    NAME is one line and exit 1.

    \b
    Examples:
      vmjob pools
      vmjob pools default
      vmjob pools default --json
    """
    data = _fetch(name, url)
    views = [data] if name is not None else data
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not views:
        click.echo("no pools")
    now = time.time()
    for i, view in enumerate(views):
        if i:
            click.echo("")
        for line in format_pool(view, now):
            click.echo(line)


def _fetch(name: str | None, url: str | None) -> Any:
    client = client_for(url)
    try:
        return client.pools(name)
    except NoDaemon:
        if url:
            raise
    finally:
        client.close()
    return _from_store(name)


def _from_store(name: str | None) -> Any:
    """No daemon: the same view from the store and the hosts' inventory, without positions."""
    from vmjobs import pools_view
    from vmjobs.hosts_view import live_cluster
    from vmjobs.store import Store

    config = click.get_current_context().obj.config
    known = config.pools
    if name is not None and name not in known:  # before connecting to any host
        raise NotFound(f"no pool {name!r} (pools: {', '.join(known) or 'none'})")
    cluster, _reached = live_cluster(config)
    store = Store(config.state_db)
    try:
        views = pools_view.from_store(store, known, cluster, {}, {}, name)
    finally:
        store.close()
    return views[0] if name is not None else views


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _of(free: int | None, total: int | None, fmt: Any = str) -> str:
    return "-" if free is None or total is None else f"{fmt(free)}/{fmt(total)}"


def _when(at: float | None, now: float) -> str:
    """A moment as HH:MM:SS with how far from now: '10:02:03 (5:00 ago)', '(in 1:00:00)'."""
    if at is None:
        return "-"
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    return f"{clock} ({format_clock(now - at)} ago)" if at <= now else \
        f"{clock} (in {format_clock(at - now)})"


def format_pool(view: dict[str, Any], now: float) -> list[str]:
    """One pool as text: a title line, then its members, holders and queue as tables."""
    members = view["members"]
    lines = [f"pool {view['name']}: {len(members)} member{'s' if len(members) != 1 else ''}, "
             f"{view['cpus_free']}/{view['cpus_total']} cores free"]
    lines += _table([("HOST", "STATE", "CORES FREE", "MEMORY FREE", "NICS FREE")] + [
        (m["host"], m["state"], _of(m["cpus_free"], m["cpus_total"]),
         _of(m["memory_free_mib"], m["memory_total_mib"], format_mib),
         _of(m["nics_free"], m["nics_total"])) for m in members])
    holders = view["holders"]
    if holders:
        lines.append("holders:")
        lines += _table([("KIND", "ID", "USER", "HOST", "CORES", "SINCE", "UNTIL")] + [
            (h["kind"], h["id"], h["owner"], h["host"] or "-", str(h["cpus"]),
             _when(h["since"], now), _when(h["until"], now)) for h in holders])
    else:
        lines.append("holders: none")
    queue = view["queue"]
    if queue:
        lines.append("queue:")
        lines += _table([("POS", "JOB", "USER", "CORES", "WHY")] + [
            (str(q["position"] or "-"), q["id"], q["owner"], str(q["cpus"]),
             q["waiting_because"] or "waiting for the scheduler") for q in queue])
    else:
        lines.append("queue: empty")
    return lines
