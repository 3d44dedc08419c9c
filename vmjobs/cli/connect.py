"""How a client command finds the daemon: `--url` / `$VMJOBS_URL`, else the config's socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vmjobs.client import Client
from vmjobs.config import DEFAULT_SOCKET


def url_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--url", default=None, metavar="URL", envvar="VMJOBS_URL",
        help="The daemon: unix:///path/to/vmjobs.sock or ssh://user@head "
             "(default: $VMJOBS_URL, else the config's socket).",
    )(func)


def client_for(url: str | None) -> Client:
    """The daemon at --url / $VMJOBS_URL, else at the config's socket. With a URL no config is
    read: a remote user needs none (an ssh:// URL without a path means the head's default)."""
    if url:
        return Client.from_url(url, DEFAULT_SOCKET)
    return Client.from_url(None, click.get_current_context().obj.config.socket)
