"""`vmjob run`: run one job in its own guest and exit with its exit code.

With a daemon reachable (`--url`, `$VMJOBS_URL`, or the config's socket answering) the job is
submitted to it and followed: its output streams here, Ctrl+C or SIGTERM cancels it, and the
command exits with the job's code. With no daemon it runs in this process (`vmjobs.runner`),
sharing the daemon's store and its UNIQUE reservations, so the two can never double-book a core.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from vmjobs.cli.connect import client_for
from vmjobs.cli.jobs import report_end
from vmjobs.cli.options import job_options, spec_from_options
from vmjobs.cli.submit import submission, submit_job
from vmjobs.client import ApiFailure, Client
from vmjobs.config import Config
from vmjobs.errors import VmjobsError
from vmjobs.outcome import EXIT_NOT_STARTED
from vmjobs.runner import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, RunRequest, interruptible
from vmjobs.runner import run as run_job
from vmjobs.spec import Spec, SpecError, check_paths
from vmjobs.transport import Target


def write_out(text: str) -> None:
    """The job's output as it arrives, passed on unchanged (no newline added)."""
    sys.stdout.write(text)
    sys.stdout.flush()


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
@click.argument("argv", nargs=-1, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, **params: Any) -> int:
    """Run CMD in a new guest with dedicated cpus; stream its output; exit with its code.

    With a daemon (vmjob serve) reachable, the job goes through its queue and Ctrl+C cancels
    it; without one it runs directly from this process.

    Exit codes: the job's own; 124 when --timeout stopped it; 125 when the guest gave no exit
    status or its output was refused; 130/143 when interrupted (the guest is destroyed and
    everything released); 75 when --wait-timeout or --no-wait gave up before it started; 2
    for a bad option or job spec; 1 for other errors before the job started.

    \b
    Examples:
      vmjob run -- uname -a
      vmjob run --cpus 2 --mem 1G --input ./data --output ./results -- ./simulate
      vmjob run --nics 2 --numa strict --timeout 2h -- ./bench.sh
      vmjob run --wait-timeout 2h -- make check
      vmjob run --threads isolate --hugepages 2M --label nic=x710 -- ./latency
      vmjob run -f job.yaml --cpus 4
    """
    spec = spec_from_options(params, params.pop("spec_file"))  # refused before anything runs
    check_paths(spec)
    config = ctx.obj.config
    client = reachable_daemon(params["url"], config)
    if client is None:
        return _direct(config, spec)
    try:
        return _through_daemon(client, spec)
    finally:
        client.close()


def _direct(config: Config, spec: Spec) -> int:
    if spec.wait_timeout is not None or spec.priority != 0:
        option = "--wait-timeout" if spec.wait_timeout is not None else "--priority"
        raise SpecError(f"{option} needs the daemon, and none answers at {config.socket} "
                        "(start one with 'vmjob serve'); without it run starts at once "
                        "or fails")
    job = RunRequest(
        argv=spec.argv, request=spec.request(), env=dict(spec.env),
        input_dir=Path(spec.input) if spec.input is not None else None,
        output_dir=Path(spec.output) if spec.output is not None else None,
        timeout_s=spec.time_limit, image=spec.image,
    )
    return run_job(config, job, write_out, note)


def _through_daemon(client: Client, spec: Spec) -> int:
    body = submission(spec, client)
    view = submit_job(client, body)  # --no-wait without room: NotStarted, exit 75
    job_id = view["id"]
    if view["state"] == "QUEUED" and view.get("position"):
        note(f"job {job_id} queued at position {view['position']}: {view['waiting_because']}")
    else:
        note(f"job {job_id} submitted")
    try:
        with interruptible():
            for chunk in client.logs(job_id, follow=True):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            final = client.wait(job_id)
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        try:
            final = client.cancel(job_id)
        except ApiFailure as failure:
            if failure.status != 409:
                raise
            final = client.wait(job_id)  # it ended by itself just before the cancel arrived
        if final["state"] == "CANCELLED":
            note(f"job {job_id} cancelled ({name}); guest destroyed, reservation released")
            return EXIT_SIGINT if exc.signum == signal.SIGINT else EXIT_SIGTERM
    return report_end(final, client, Path(spec.output) if spec.output is not None else None)
