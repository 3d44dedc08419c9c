"""`vmjob run`: run one job in its own guest and exit with its exit code.

With a daemon reachable (`--url`, `$VMJOBS_URL`, or the config's socket answering) the job is
submitted to it and followed: its output streams here, Ctrl+C or SIGTERM cancels it, and the
command exits with the job's code. With no daemon it runs in this process through the daemon's
own core, scoped to this one job (`vmjobs.daemon.direct`), sharing the daemon's store and its
UNIQUE reservations, so the two can never double-book a core. Both modes end a job with the
same line and exit code (`vmjobs.outcome`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmjobs.cli.connect import client_for
from vmjobs.cli.jobs import report_end
from vmjobs.cli.options import job_options, spec_from_options
from vmjobs.cli.output import json_option
from vmjobs.cli.submit import submission, submit_job
from vmjobs.client import ApiFailure, Client
from vmjobs.config import Config
from vmjobs.errors import VmjobsError
from vmjobs.guest_protocol import input_entries
from vmjobs.interrupt import Interrupted, interruptible
from vmjobs.jobtable import place_in_line
from vmjobs.outcome import EXIT_NOT_STARTED, cancelled_line, interrupted_exit
from vmjobs.spec import Spec, SpecError, check_paths
from vmjobs.transport import Target


def write_out(text: str) -> None:
    """The job's output as it arrives, passed on unchanged (no newline added)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def write_json(text: str) -> None:
    """--json: each piece of the job's output as one JSON object a line (as `logs --json`)."""
    write_out(json.dumps({"output": text}) + "\n")


def note(message: str) -> None:
    click.echo(f"vmjob: {message}", err=True)


def reachable_daemon(url: str | None, config: Config) -> Client | None:
    """The daemon to submit to, or None to run in this process.

    An explicit --url / $VMJOBS_URL must answer; the config's socket is used when it does.
    """
    if url:
        return client_for(url)
    if not config.socket.exists():
        return None
    client = Client(Target(config.socket))
    try:
        client.status()
    except VmjobsError:
        client.close()
        return None  # a socket file left by a daemon that is gone
    return client


@click.command(context_settings={"ignore_unknown_options": False})
@job_options
@click.option("--priority", default=None, metavar="N",
              help="Daemon only: higher starts first; FIFO within a priority.  [default: 0]")
@click.option("--wait-timeout", default=None, metavar="DURATION",
              help=f"Daemon only: give up if the job has not started after this long (exit "
                   f"{EXIT_NOT_STARTED}; nothing is left behind).")
@click.option("--no-wait", is_flag=True,
              help=f"Fail at once (exit {EXIT_NOT_STARTED} with a daemon) unless the job can "
                   "start now. Without a daemon, run never waits.")
@click.option("--url", default=None, metavar="URL", envvar="VMJOBS_URL",
              help="The daemon: unix:///path/to/vmjobs.sock or ssh://user@head (default: "
                   "$VMJOBS_URL, else the config's socket if a daemon answers there).")
@json_option
@click.argument("argv", nargs=-1, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, as_json: bool, **params: Any) -> int:
    """Run CMD in a new guest with dedicated cpus; stream its output; exit with its code.

    With a daemon (vmjob serve) reachable, the job goes through its queue and Ctrl+C cancels
    it; without one it runs directly from this process.

    Exit codes: the job's own; 124 when --timeout stopped it; 125 when the guest gave no exit
    status or its output was refused; 130/143 when interrupted (the guest is destroyed and
    everything released); 75 when --wait-timeout or --no-wait gave up before it started; 2
    for a bad option or job spec; 1 for other errors before the job started.

    With --json the output comes as one {"output": TEXT} object a line, then a last line
    {"exit_code": N} (and "job": ID through a daemon).

    \b
    Examples:
      vmjob run -- uname -a
      vmjob run --cpus 2 --mem 1G --input ./data --output ./results -- ./simulate
      vmjob run --nics 2 --numa strict --timeout 2h --input ./bench -- ./bench.sh
      vmjob run --wait-timeout 2h -- sh -c 'nproc; head -1 /proc/meminfo'
      vmjob run --threads isolate --hugepages 2M --label nic=x710 --input ./lat -- ./latency
      vmjob run -f job.yaml --cpus 4
    """
    spec = spec_from_options(params, params.pop("spec_file"))  # refused before anything runs
    check_paths(spec)
    config = ctx.obj.config
    write = write_json if as_json else write_out
    client = reachable_daemon(params["url"], config)
    ended: dict[str, Any] = {}
    if client is None:
        code = _direct(config, spec, write)
    else:
        try:
            code = _through_daemon(client, spec, write, ended)
        finally:
            client.close()
    if as_json:
        click.echo(json.dumps({"exit_code": code, **ended}))
    return code


def _direct(config: Config, spec: Spec, write: Callable[[str], None]) -> int:
    if spec.wait_timeout is not None or spec.priority != 0:
        option = "--wait-timeout" if spec.wait_timeout is not None else "--priority"
        raise SpecError(f"{option} needs the daemon, and none answers at {config.socket} "
                        "(start one with 'vmjob serve'); without it run starts at once "
                        "or fails")
    if spec.input is not None:
        input_entries(Path(spec.input))  # the guest protocol's rules, as a submit checks them
    if not logging.getLogger().handlers:
        # the core's log lines are the daemon's log; here the job's end line says it all
        logging.getLogger("vmjobs.daemon").addHandler(logging.NullHandler())
    # Imported here: the client commands need none of the daemon core's own dependencies
    # (libvirt's event loop, the metrics library) to talk to a daemon.
    from vmjobs.daemon import direct

    return direct.run(config, spec, write, note)


def _through_daemon(client: Client, spec: Spec, write: Callable[[str], None],
                    ended: dict[str, Any]) -> int:
    body = submission(spec, client)
    view = submit_job(client, body)  # --no-wait without room: NotStarted, exit 75
    job_id = ended["job"] = view["id"]
    if view["state"] == "QUEUED" and view.get("position"):
        note(f"job {job_id} queued at {place_in_line(view)}: {view['waiting_because']}")
    else:
        note(f"job {job_id} submitted")
    try:
        with interruptible():
            for chunk in client.logs(job_id, follow=True):
                write(chunk)
            final = client.wait(job_id)
    except Interrupted as exc:
        try:
            final = client.cancel(job_id)
        except ApiFailure as failure:
            if failure.status != 409:
                raise
            final = client.wait(job_id)  # it ended by itself just before the cancel arrived
        if final["state"] == "CANCELLED":
            note(cancelled_line(job_id, exc.signum))
            return interrupted_exit(exc.signum)
    return report_end(final, client, Path(spec.output) if spec.output is not None else None)
