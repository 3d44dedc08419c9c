"""`vmjob run`: run one job in its own guest and exit with its exit code.

With a daemon reachable (`--url`, `$VMJOBS_URL`, or the config's socket answering) the job is
submitted to it and followed: its output streams here, Ctrl+C or SIGTERM cancels it, and the
command exits with the job's code. With no daemon it runs in this process through the daemon's
own core, scoped to this one job (`vmjobs.daemon.direct`), sharing the daemon's store and its
UNIQUE reservations, so the two can never double-book a core. Both modes end a job with the
same line and exit code (`vmjobs.outcome`).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmjobs.cli.connect import client_for
from vmjobs.cli.jobs import report_end
from vmjobs.cli.options import gang_options, job_options, spec_from_options
from vmjobs.cli.output import json_option
from vmjobs.cli.submit import inside, reservation_options, submission, submit_job
from vmjobs.client import ApiFailure, Client, DaemonLost, Reconnect
from vmjobs.config import Config
from vmjobs.errors import VmjobsError
from vmjobs.guest_protocol import input_entries
from vmjobs.interrupt import Interrupted, interruptible
from vmjobs.jobs import HostLossPolicy
from vmjobs.jobtable import place_in_line
from vmjobs.outcome import EXIT_NOT_STARTED, cancelled_line, interrupted_exit
from vmjobs.spec import Spec, SpecError, check_paths
from vmjobs.terminal import TerminalInput
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
@gang_options
@click.option("--priority", default=None, metavar="N",
              help="Daemon only: higher starts first; FIFO within a priority.  [default: 0]")
@click.option("--wait-timeout", default=None, metavar="DURATION",
              help=f"Daemon only: give up if the job has not started after this long (exit "
                   f"{EXIT_NOT_STARTED}; nothing is left behind).")
@click.option("--no-wait", is_flag=True,
              help=f"Fail at once (exit {EXIT_NOT_STARTED} with a daemon) unless the job can "
                   "start now. Without a daemon, run never waits.")
@click.option("--borrow", is_flag=True,
              help="Daemon only: may run on cores other running jobs hold and leave idle; "
                   "moved off when they want them back (implies preemptible).")
@click.option("--no-lend", is_flag=True,
              help="Never lend this job's idle cores to --borrow jobs.")
@click.option("--url", default=None, metavar="URL", envvar="VMJOBS_URL",
              help="The daemon: unix:///path/to/vmjobs.sock or ssh://user@head (default: "
                   "$VMJOBS_URL, else the config's socket if a daemon answers there).")
@click.option("-i", "--interactive", is_flag=True,
              help="Forward this command's stdin to the job (end of file included); "
                   "without it the job's stdin is empty. For a terminal, see 'vmjob shell'.")
@reservation_options
@json_option
@click.argument("argv", nargs=-1, metavar="-- CMD [ARG...]")
@click.pass_context
def run(ctx: click.Context, as_json: bool, interactive: bool, **params: Any) -> int:
    """Run CMD in a new guest with dedicated cpus; stream its output; exit with its code.

    With a daemon (vmjob serve) reachable, the job goes through its queue and Ctrl+C cancels
    it; without one it runs directly from this process.

    Exit codes: the job's own; 124 when --timeout stopped it; 125 when the guest gave no exit
    status or its output was refused; 130/143 when interrupted (the guest is destroyed and
    everything released); 75 when --wait-timeout or --no-wait gave up before it started; 77
    for a wrong or missing --key of a --reservation; 2 for a bad option or job spec; 1 for
    other errors before the job started.

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
      vmjob run --nodes 2 -- sh -c 'echo node $VMJOB_NODE of $VMJOB_NODES'   # needs a daemon
      vmjob run --reservation "$R" --key "$K" -- nproc   # inside 'vmjob reserve'
      vmjob run --borrow --time-limit 1h --input ./sw -- ./sweep   # lent cores if none are free
      printf 'echo hi\\nexit 4\\n' | vmjob run -i -- sh
    """
    reservation, key = params.pop("reservation"), params.pop("key")
    spec = spec_from_options(params, params.pop("spec_file"))  # refused before anything runs
    if interactive:
        if spec.array is not None or spec.nodes is not None:
            raise SpecError("-i cannot be given with --nodes or --array (one job reads this "
                            "command's stdin)")
        spec = dataclasses.replace(spec, stdin="pipe")
    check_paths(spec)
    write = write_json if as_json else write_out
    code, ended = execute(ctx.obj.config, spec, params["url"], write, (reservation, key))
    if as_json:
        click.echo(json.dumps({"exit_code": code, **ended}))
    return code


def execute(config: Config, spec: Spec, url: str | None, write: Callable[[str], None],
            inside_of: tuple[str | None, str | None] = (None, None)
            ) -> tuple[int, dict[str, Any]]:
    """Run `spec` through the daemon if one is reachable, else in this process; the exit
    code and what to add to --json's last line (the job's id through a daemon).
    `inside_of`: (reservation, key) from --reservation/--key (daemon only). An interactive
    job (`spec.stdin`) gets this process's stdin (`vmjobs.terminal`)."""
    client = reachable_daemon(url, config)
    ended: dict[str, Any] = {}
    if client is None:
        if inside_of[0] is not None:
            raise VmjobsError(f"--reservation needs the daemon (vmjob serve), and none "
                              f"answers at {config.socket}")
        return _direct(config, spec, write), ended
    try:
        return _through_daemon(client, spec, write, ended, inside_of), ended
    finally:
        client.close()


# how often a waiting `run` asks where its job stands: quick at first (a job that starts at
# once is seen placed before anything is printed), then at a pace a daemon never notices
WAIT_POLL_S = (0.2, 0.3, 0.5, 1.0)


def waiting_line(view: dict[str, Any]) -> str | None:
    """The line a waiting job gets: where it waits and why; None while the scheduler has not
    judged it yet (no position)."""
    if view["state"] != "QUEUED" or view.get("position") is None:
        return None
    why = view.get("waiting_because") or "waiting for room"
    return f"job {view['id']} queued at {place_in_line(view)}: {why}"


def wait_to_start(client: Client, view: dict[str, Any], say: Callable[[str], None]) -> None:
    """Follow a queued job until it leaves the queue (started, cancelled, or given up by
    --wait-timeout), saying where it waits and why when it starts waiting and whenever that
    changes. A job that starts at once says nothing. A daemon that goes away meanwhile (a
    restart) is waited for, as `wait` and `logs -f` do (`Reconnect`)."""
    said: str | None = None
    polls = 0
    retry = Reconnect(client)
    while view["state"] == "QUEUED":
        line = waiting_line(view)
        if line is not None and line != said:
            say(line)
            said = line
        time.sleep(WAIT_POLL_S[min(polls, len(WAIT_POLL_S) - 1)])
        polls += 1
        try:
            view = client.job(view["id"])
        except DaemonLost as exc:
            retry.lost(exc)
            continue
        retry.ok()
    if said is not None and view["state"] in ("PLACED", "STARTING", "RUNNING"):
        say(f"job {view['id']} starts on {view.get('host') or 'its host'}")


def _direct(config: Config, spec: Spec, write: Callable[[str], None]) -> int:
    if spec.nodes is not None:
        raise SpecError(f"--nodes needs the daemon, and none answers at {config.socket} "
                        "(start one with 'vmjob serve')")
    needs_daemon = [option for option, given in (
        ("--wait-timeout", spec.wait_timeout is not None), ("--borrow", spec.borrow),
        ("--priority", spec.priority != 0),
        ("--on-host-loss", spec.on_host_loss != HostLossPolicy.FAIL),
        ("--checkpoint-every", spec.checkpoint_every is not None)) if given]
    if needs_daemon:
        option = needs_daemon[0]
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

    if spec.stdin is None:
        return direct.run(config, spec, write, note)
    with TerminalInput(tty_job=spec.stdin == "tty") as terminal:
        return direct.run(config, spec, write, note, terminal)


def follow_console(client: Client, job_id: str, tty_job: bool,
                   write: Callable[[str], None]) -> None:
    """An interactive job through the daemon: its console stream, this process's stdin going
    in and the job's output coming out, until the job ends (the terminal, if raw, is restored
    before this returns or raises)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    link = client.console(job_id, with_input=True)
    try:
        with TerminalInput(tty_job=tty_job) as terminal:
            # called once the job has left the queue (`wait_to_start`): while it waited,
            # the terminal was as usual and Ctrl+C cancelled it
            terminal.start(link.send)
            for chunk in link.output():
                if text := decoder.decode(chunk):
                    write(text)
    finally:
        link.close()
    if tail := decoder.decode(b"", final=True):
        write(tail)


def _through_daemon(client: Client, spec: Spec, write: Callable[[str], None],
                    ended: dict[str, Any],
                    inside_of: tuple[str | None, str | None] = (None, None)) -> int:
    body = inside(submission(spec, client), *inside_of)
    view = submit_job(client, body)  # --no-wait without room: NotStarted, exit 75
    job_id = ended["job"] = view["id"]
    if view.get("gang"):
        return _gang_through_daemon(client, view, spec, write)
    note(f"job {job_id} submitted")
    try:
        with interruptible():
            if view["state"] == "QUEUED":
                wait_to_start(client, view, note)
            if spec.stdin is not None:
                follow_console(client, job_id, spec.stdin == "tty", write)
            else:
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


def _gang_through_daemon(client: Client, view: dict[str, Any], spec: Spec,
                         write: Callable[[str], None]) -> int:
    """`run --nodes N`: wait for the whole gang, then print each member's output in index
    order, each after a line naming it on stderr; the gang's exit code (the first failed
    member's, else 0). Ctrl+C cancels the gang."""
    gang_id = view["id"]
    note(f"gang {gang_id} submitted: members {gang_id}.0 .. {gang_id}.{view['nodes'] - 1} "
         f"(vmjob logs -f {gang_id}.0)")
    try:
        with interruptible():
            final = client.wait(gang_id)
    except Interrupted as exc:
        final = client.cancel(gang_id)
        note(cancelled_line(gang_id, exc.signum))
        return interrupted_exit(exc.signum)
    for member in final["members"]:
        code = member.get("exit_code")
        note(f"{member['id']} on {member.get('host') or '-'}: {member['state']}"
             + (f", exit {code}" if code is not None else ""))
        for chunk in client.logs(member["id"]):
            write(chunk)
    return report_end(final, client, None)
