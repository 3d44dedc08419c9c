"""`vmjob serve`: run the controller daemon in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from vmjobs.errors import VmjobsError


@click.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              metavar="PATH", help="Unix socket to listen on (default: config `socket`, "
                                   "/run/vmjobs/vmjobs.sock).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on this TCP port (default: config `metrics_port`; "
                   "none).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address the metrics port binds to.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True, help="How much the daemon logs to stderr.")
@click.pass_obj
def serve(obj: object, socket_path: Path | None, metrics_port: int | None, metrics_address: str,
          log_level: str) -> None:
    """Run the daemon: queue, scheduler, host connections; listens on a unix socket.

    Jobs keep running when the daemon stops; a restarted daemon finds them again, collects
    those that ended meanwhile and frees what nothing holds. Stop it with SIGTERM or Ctrl+C.
    Run it as root (it talks to qemu:///system and reads callers' uids from the socket).

    \b
    Examples:
      vmjob serve
      vmjob --config /etc/vmjobs/config.yaml serve --metrics-port 9464
      vmjob serve --socket /tmp/vmjobs.sock --log-level debug
    """
    from vmjobs.daemon.main import serve as run_daemon

    config = click.get_current_context().obj.config
    path = socket_path or config.socket
    if not path.is_absolute():
        raise VmjobsError(f"--socket {path}: must be an absolute path")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s vmjobd: %(message)s")
    run_daemon(config, path, metrics_port or config.metrics_port, metrics_address)
