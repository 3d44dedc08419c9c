"""`vmjob kv JOB get KEY | set KEY VALUE`: a running gang's key-value store from the host, the
same store its members' `vmjob-ctl kv` reads and writes (vmjobs/control.py). Owner or admin."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import click

from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.output import json_option
from vmjobs.client import segment


@click.command()
@click.argument("job")
@click.argument("action", type=click.Choice(["get", "set"]))
@click.argument("key")
@click.argument("value", required=False)
@json_option
@url_option
def kv(job: str, action: str, key: str, value: str | None, as_json: bool,
       url: str | None) -> None:
    """Read or set a key in a running gang's key-value store.

    JOB is the gang's id or one of its members' (GANG.i). `set` wakes the members waiting in
    `vmjob-ctl kv get KEY --wait`. Keys: 1-64 of A-Z a-z 0-9 . _ : -; values: at most 256
    printable ASCII characters. With --json: {"gang": ID, "key": KEY, "value": VALUE}.

    \b
    Examples:
      vmjob kv 3f9a1c2e set server-ready yes
      vmjob kv 3f9a1c2e get address
    """
    if (action == "set") != (value is not None):
        raise click.UsageError("give a VALUE with set, and none with get")
    path = f"/v1/jobs/{segment(job)}/kv"
    client = client_for(url)
    try:
        if action == "get":
            answer = client.call("GET", f"{path}?{urlencode({'key': key})}")
        else:
            answer = client.call("POST", path, {"key": key, "value": value})
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    elif action == "get":
        click.echo(answer["value"])
