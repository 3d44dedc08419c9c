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
    could not be reached. Use a profile with '--profile NAME' on run, submit, reserve and
    shell; options given with it win.

    \b
    Examples:
      vmjob profiles
      vmjob profiles 2nic --json
      vmjob run --profile 2nic -- sh -c 'nproc; echo $NIC0 $NIC1'
    """
    if url:
        from vmjobs.cli.connect import client_for

        client = client_for(url)
        try:
            rows = client.profiles()
        finally:
            client.close()
        where = url
    else:
        from vmjobs.hosts_view import live_cluster
        from vmjobs.profiles import listing

        config = obj.config
        if name is not None and name not in config.profiles:
            _unknown(name, list(config.profiles), config.path)
        cluster, _reached = live_cluster(config)
        rows = listing(config, cluster)
        where = config.path
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
        if not rows:
            _unknown(name, [], where)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in format_rows(rows):
        click.echo(line)


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
