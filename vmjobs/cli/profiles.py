"""`vmjob profiles`: the config's hardware profiles and how many more jobs of each could start
now on each host."""

from __future__ import annotations

import json
from typing import Any

import click

from vmjobs.cli.output import json_option
from vmjobs.errors import UsageError


@click.command("profiles")
@click.argument("name", required=False)
@json_option
@click.option("--url", default=None, metavar="URL", envvar="VMJOBS_URL",
              help="Ask the daemon at this URL (unix:///path/to/vmjobs.sock or "
                   "ssh://user@head; default: $VMJOBS_URL) instead of the config's hosts.")
@click.pass_obj
def profiles(obj: Any, name: str | None, as_json: bool, url: str | None) -> None:
    """List the hardware profiles (config 'profiles:') and how many more jobs of each could
    start now on each host.

    A count places jobs of the profile one after another on what is free now, as the
    scheduler would (cores, memory, NICs, NUMA policy, pool and labels); '-' is a host that
    could not be reached. The daemon answers when one runs (at --url, else at the config's
    socket); without one the hosts and the store are read here. Use a profile with
    '--profile NAME' on run, submit, reserve and shell; options given with it win.

    \b
    Examples:
      vmjob profiles
      vmjob profiles 2nic --json
      vmjob run --profile 2nic -- sh -c 'nproc; echo $NIC0 $NIC1'
    """
    rows, where = _from_daemon(url, obj)
    if rows is None:
        from vmjobs.hosts_view import live_cluster
        from vmjobs.profiles import listing

        config = obj.config
        if name is not None and name not in config.profiles:
            _unknown(name, list(config.profiles), config.path)
        cluster, _reached = live_cluster(config)
        rows = listing(config, cluster)
        where = config.path
    if name is not None:
        known = [r["name"] for r in rows]
        rows = [r for r in rows if r["name"] == name]
        if not rows:
            _unknown(name, known, where)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in format_rows(rows):
        click.echo(line)


def _from_daemon(url: str | None, obj: Any) -> tuple[list[dict[str, Any]] | None, str]:
    """The daemon's answer (`GET /v1/profiles`): at --url / $VMJOBS_URL, which must answer,
    else at the config's socket when a daemon answers there; (None, "") to work it out here
    (no daemon: the hosts through libvirt and the store, as `vmjob hosts` does)."""
    from vmjobs.cli.connect import client_for
    from vmjobs.client import NoDaemon

    if not url and not obj.config.socket.exists():
        return None, ""
    client = client_for(url)
    try:
        return client.profiles(), client.target.describe()
    except NoDaemon:
        if url:
            raise
        return None, ""  # a socket file left by a daemon that is gone
    finally:
        client.close()


def _unknown(name: str, known: list[str], where: str) -> None:
    listed = f" (profiles: {', '.join(known)})" if known else ""
    raise UsageError(f"unknown profile {name!r} at {where}{listed}")


def _shape(row: dict[str, Any]) -> str:
    """The profile's fields in their option form: `--cpus 2 --nics 2 --numa strict`."""
    parts = []
    for key in ("cpus", "mem", "nics", "numa", "threads", "hugepages", "pool"):
        if row.get(key) is not None:
            parts.append(f"--{key} {row[key]}")
    parts += [f"--label {k}={v}" for k, v in sorted((row.get("labels") or {}).items())]
    return " ".join(parts) or "(defaults)"


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """One line per profile: its name, its fields as options, and per host the count."""
    hosts = sorted({h for r in rows for h in r["hosts"]})
    table = [("PROFILE", "SPEC", *hosts)]
    for r in rows:
        counts = ["-" if r["hosts"].get(h) is None else str(r["hosts"][h]) for h in hosts]
        table.append((r["name"], _shape(r), *counts))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table]
