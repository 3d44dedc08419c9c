"""`vmjob submit`: queue a job (or a job array) with the daemon.

The only client command that needs the job spec's checks (`vmjobs.spec`, `-f job.yaml`), so it
lives apart from `list`/`show`/... which must stay light to import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.options import gang_options, job_options, spec_from_options
from vmjobs.cli.output import json_option
from vmjobs.client import ApiFailure, Client
from vmjobs.errors import VmjobsError
from vmjobs.outcome import EXIT_NOT_STARTED
from vmjobs.spec import Spec, SpecError, check_paths


class NotStarted(VmjobsError):
    """--no-wait found no room, or --wait-timeout expired."""

    exit_code = EXIT_NOT_STARTED
    json_code = "not_started"


def submission(spec: Spec, client: Client) -> dict[str, Any]:
    """The JSON body of POST /v1/jobs: the spec's canonical form, with --input uploaded first
    (its token instead of the path) and --output made absolute."""
    check_paths(spec)
    body = spec.to_dict()
    if spec.output is not None:
        body["output"] = str(Path(spec.output).absolute())
    if spec.input is not None:
        # the guest protocol's own rules (regular files and directories only), here, before
        # anything is sent: refused at submit with the user's path, not at start with the
        # spool's
        from vmjobs.guest_protocol import input_entries  # tar/cpio machinery: only with --input

        input_entries(Path(spec.input))
        body["input"] = client.upload_dir(Path(spec.input))
    return body


def queue_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--time-limit", default=None, metavar="DURATION",
                     help="Longest the job may run (same as --timeout); lets it start early "
                          "when that cannot delay the job first in line."),
        click.option("--priority", default=None, metavar="N",
                     help="Higher starts first; FIFO within a priority.  [default: 0]"),
        click.option("--preemptible", is_flag=True,
                     help="May be migrated or checkpointed (and restored later) to make room "
                          "for jobs that are not (with the daemon's 'preemption: on')."),
        click.option("--borrow", is_flag=True,
                     help="May run on cores other running jobs hold and leave idle; moved "
                          "off (or checkpointed) when their owner wants them back. Implies "
                          "--preemptible; needs the daemon's 'borrow:' setting."),
        click.option("--no-lend", is_flag=True,
                     help="Never lend this job's idle cores to --borrow jobs."),
        click.option("--wait-timeout", default=None, metavar="DURATION",
                     help=f"Give up if the job has not started after this long (exit "
                          f"{EXIT_NOT_STARTED}; nothing is left behind)."),
        click.option("--no-wait", is_flag=True,
                     help=f"Fail at once (exit {EXIT_NOT_STARTED}) unless the job can start now."),
        url_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def reservation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--reservation R --key K`: run inside a held reservation (`vmjob reserve`)."""
    func = click.option("--key", default=None, envvar="VMJOB_KEY", metavar="KEY",
                        help="The reservation's key, if it was made with one "
                             "($VMJOB_KEY keeps it out of the process list).")(func)
    return click.option("--reservation", default=None, metavar="R",
                        help="Run inside held reservation R (see 'vmjob reserve'), on its "
                             "cores only; daemon only.")(func)


def inside(body: dict[str, Any], reservation: str | None, key: str | None) -> dict[str, Any]:
    """The submit body with the reservation to run inside and its key (never stored). A key
    without a reservation is not sent: `$VMJOB_KEY` exported for a pipeline's steps must not
    break its other jobs."""
    if reservation is not None:
        body["reservation"] = reservation
        if key is not None:
            body["key"] = key
    return body


def submit_job(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return client.submit(body)
    except ApiFailure as exc:
        if exc.code == "not_started":
            raise NotStarted(str(exc)) from None
        if exc.code == "usage":  # a daemon stricter than this client: still a usage error
            raise SpecError(str(exc)) from None
        raise


@click.command()
@job_options
@queue_options
@gang_options
@reservation_options
@click.option("--array", default=None, metavar="INDICES[%N]",
              help="A job array: one job per index (1-100, 1,3,5-7; indices 0-1000), each "
                   "with $VMJOB_ARRAY_INDEX set; %N: at most N of them run at once.")
@json_option
@click.argument("argv", nargs=-1, metavar="-- CMD [ARG...]")
def submit(as_json: bool, **params: Any) -> None:
    """Queue CMD to run in its own guest; print the job's id.

    The job waits in a fair queue (FIFO within --priority) until its cpus, memory and NICs
    are free, then runs while nobody watches. Follow it with 'vmjob logs -f JOB', collect its
    exit code with 'vmjob wait JOB'. With --array it prints the array's id ARRAY; its jobs
    are ARRAY_INDEX ('vmjob cancel ARRAY' cancels them all). With --nodes N it prints the
    gang's id GANG: N guests started together or not at all, members GANG.0 .. GANG.N-1
    ('vmjob wait GANG' exits with the first failed member's code, else 0).

    \b
    Examples:
      vmjob submit --cpus 8 --mem 64G --input ./sim -- ./simulate   # ./sim/simulate
      JOB=$(vmjob submit --time-limit 10m -- sh -c 'nproc; free -m') && vmjob wait "$JOB"
      vmjob submit -f job.yaml --priority 5
      vmjob submit --no-wait -- uname -a          # exit 75 unless it can start now
      vmjob submit --name sweep-7 --time-limit 1:30:00 --input ./sweep -- ./run.sh 7
      vmjob submit --threads isolate --hugepages 1G --label rack=r1 --input ./lat \\
          -- ./latency-bench
      vmjob submit --array 1-100%10 --input ./sw -- sh -c './sweep --case $VMJOB_ARRAY_INDEX'
      vmjob submit --nodes 4 --cpus 8 --input ./mpi -- ./rank.sh     # JOB.0 .. JOB.3 apart
      vmjob submit -f gang.yaml   # nodes: [{name: server, cmd: [./serve]}, {cmd: [./probe]}]
      vmjob submit --reservation "$R" --key "$K" --input ./b -- ./bench.sh  # in 'reserve'
      vmjob submit --borrow --cpus 1 -- sh -c 'nproc'   # may run on cores others leave idle
    """
    reservation, key = params.pop("reservation"), params.pop("key")
    spec = spec_from_options(params, params.pop("spec_file"))
    client = client_for(params.pop("url"))
    try:
        view = submit_job(client, inside(submission(spec, client), reservation, key))
    finally:
        client.close()
    # an array answers {"array": ID, "jobs": [...]}, a single job with the job
    click.echo(json.dumps(view, indent=2) if as_json else view.get("array") or view["id"])
