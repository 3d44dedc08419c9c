"""`vmjob list|show|logs|wait|cancel`: the daemon's client commands (`submit` is in submit.py).

Each parses, makes one or two calls through `vmjobs.client`, and prints. The daemon decides
who may do what (from the socket's peer credentials); these commands only show its answer.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from vmjobs import jobtable
from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.output import json_option
from vmjobs.client import ApiFailure, Client
from vmjobs.outcome import EXIT_WAIT_EXPIRED, end_line, ended_with_output, exit_code
from vmjobs.units import format_clock, format_mib

# --- list / show ----------------------------------------------------------------------------


@click.command(name="list")
@click.option("--all", "include_finished", is_flag=True,
              help="Include jobs that have ended.")
@click.option("-u", "--user", "users", multiple=True, metavar="USER[,USER]",
              help="Only these owners' jobs (repeatable or comma list).")
@click.option("-t", "--state", "states", multiple=True, metavar="STATE[,STATE]",
              help="Only jobs in these states, any case (repeatable or comma list); an ended "
                   "state (completed, failed, ...) includes ended jobs without --all.")
@click.option("--host", "hosts", multiple=True, metavar="HOST[,HOST]",
              help="Only jobs on (or asking for) these hosts.")
@click.option("--pool", "pools", multiple=True, metavar="POOL[,POOL]",
              help="Only jobs asking for these pools.")
@click.option("-n", "--name", "names", multiple=True, metavar="PATTERN",
              help="Only jobs whose name matches this shell pattern (sweep-*; repeatable).")
@click.option("-o", "--format", "columns", default=None, metavar="COL[,COL]",
              help="Columns to show, in order: " + ", ".join(jobtable.COLUMNS) + ".  "
                   "[default: " + ",".join(jobtable.DEFAULT_COLUMNS) + "]")
@click.option("--no-header", is_flag=True, help="Leave out the header line (for scripts).")
@json_option
@url_option
def list_jobs(include_finished: bool, users: tuple[str, ...], states: tuple[str, ...],
              hosts: tuple[str, ...], pools: tuple[str, ...], names: tuple[str, ...],
              columns: str | None, no_header: bool, as_json: bool, url: str | None) -> None:
    """List your queued and running jobs (root and the admin group: everyone's).

    Queued jobs show their place in line (POS) and why they wait. AGE counts from
    submission, or from the end for an ended job; ELAPSED is running time and TIME_LIMIT
    the limit, both [D-]HH:MM:SS as squeue prints them. Filters combine (AND); the values
    of one filter are alternatives (OR).

    \b
    Examples:
      vmjob list
      vmjob list --all --json
      vmjob list --state running,queued --user alice
      vmjob list --all --name 'sweep-*' -o id,name,state,elapsed --no-header
    """
    filters = jobtable.Filters(
        users=frozenset(jobtable.comma_list(users)), states=jobtable.parse_states(states),
        hosts=frozenset(jobtable.comma_list(hosts)), pools=frozenset(jobtable.comma_list(pools)),
        names=tuple(names))
    chosen = jobtable.parse_columns(columns)
    client = client_for(url)
    try:
        views = client.jobs(include_finished or filters.wants_ended)
    finally:
        client.close()
    views = [v for v in views if jobtable.matches(v, filters)]
    if as_json:
        click.echo(json.dumps(views, indent=2))
        return
    if not views:
        if not no_header:
            click.echo("no jobs" if include_finished or filters != jobtable.Filters()
                       else "no queued or running jobs (--all shows ended ones)")
        return
    for line in jobtable.render(jobtable.rows(views, chosen, time.time(), not no_header)):
        click.echo(line)


def _clock(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


@click.command()
@click.argument("job")
@json_option
@url_option
def show(job: str, as_json: bool, url: str | None) -> None:
    """Show a job: its spec, its placement and the timeline of its events.

    A gang's id shows the gang: its state, exit code and a line per member (JOB.i).

    \b
    Examples:
      vmjob show 3f9a1c2e
      vmjob show 3f9a1c2e.1          # member 1 of gang 3f9a1c2e
      vmjob show 3f9a1c2e --json | jq .events
    """
    client = client_for(url)
    try:
        view = client.job(job)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    if view.get("gang"):
        _show_gang(view)
        return
    request = view.get("request") or {}
    alloc = view.get("allocation")
    lines = [
        ("job", f"{view['id']} (owner {view['owner']}, uid {view['uid']})"),
        ("name", view.get("name") or "-"),
        ("state", view["state"] + (f": {view['message']}" if view.get("message") else "")),
        ("kind", view.get("kind") or "job"),
        ("command", shlex.join(view.get("argv") or []) or "-"),
        ("request", f"{request.get('cpus')} cpus, {format_mib(request.get('memory_mib', 0))}, "
                    f"{request.get('nics', 0)} NICs, numa {request.get('numa')}, "
                    f"priority {request.get('priority', 0)}"
                    + (f", host {request['host']}" if request.get("host") else "")
                    + (f", threads {request['threads']}"
                       if request.get("threads", "dedicated") != "dedicated" else "")
                    + (f", hugepages {format_mib(request['hugepage_kib'] / 1024)}"
                       if request.get("hugepage_kib") else "")
                    + "".join(f", label {k}={v}"
                              for k, v in sorted((request.get("labels") or {}).items()))),
        ("time limit", format_clock(view["time_limit"]) if view.get("time_limit") else "none"),
        ("elapsed", "-" if (run := jobtable.elapsed_seconds(view, time.time())) is None
                    else format_clock(run)),
        ("image", str(view.get("image"))),
    ]
    if view.get("kind") == "reservation":
        lines.append(("held until", time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(view["until"]))
                      if view.get("until") else "released with its client (no --duration)"
                      if view.get("tied") else "-"))
        lines.append(("jobs", ", ".join(f"{j['id']} {j['state']}"
                                               for j in view.get("jobs") or []) or "none"))
    elif view.get("reservation"):
        lines.append(("inside", f"reservation {view['reservation']}"))
    if view.get("env"):
        lines.append(("env", " ".join(f"{k}={shlex.quote(v)}" for k, v in view["env"].items())))
    if view["state"] == "QUEUED":
        lines.append(("queue", f"{jobtable.place_in_line(view)}: {jobtable.why(view)}"))
    if alloc:
        nodes = ", ".join(f"node{n['node']}: cpus {','.join(map(str, n['cpus']))}"
                          for n in alloc["nodes"])
        devices = f", NICs {', '.join(alloc['devices'])}" if alloc.get("devices") else ""
        lines.append(("placement", f"{alloc['host']}: {nodes}, "
                                   f"{format_mib(alloc['memory_mib'])}{devices}"))
    elif view.get("host"):
        lines.append(("host", view["host"]))
    for loan in view.get("loans") or ():
        lines.append(("loan", f"{loan['host']} cpu {loan['cpu']}: job {loan['owner']}'s, lent to "
                              f"job {loan['borrower']}"))
    for mem in view.get("memory_loans") or ():
        lines.append(("loan", f"{mem['host']} node {mem['node']} {format_mib(mem['mib'])}: job "
                              f"{mem['owner']}'s memory, lent to job {mem['borrower']}"))
    if view.get("memory_used_mib") is not None:
        lines.append(("memory", f"{format_mib(view['memory_used_mib'])} used (as its balloon "
                                f"reports), {format_mib(view['memory_resident_mib'] or 0)} "
                                "resident on the host"))
    if view.get("exit_code") is not None:
        lines.append(("exit code", str(view["exit_code"])))
    for name, value in lines:
        click.echo(f"{name:<11}{value}")
    click.echo("events")
    for event in view.get("events", []):
        host = f" [{event['host']}]" if event.get("host") else ""
        state = "note" if event.get("note") else event["state"]  # a note changes no state
        click.echo(f"  {_clock(event['time'])}  {state:<10}{host} "
                   f"{event.get('reason') or ''}".rstrip())


def _show_gang(view: dict[str, Any]) -> None:
    """A gang: its state and exit code, then a line per member (`vmjob show JOB.i` for one
    member's placement and events)."""
    code = "-" if view.get("exit_code") is None else str(view["exit_code"])
    lines = [
        ("gang", f"{view['id']}: {view['nodes']} members (owner {view['owner']}, uid "
                 f"{view['uid']}), on member failure: {view['on_member_failure']}"),
        ("name", view.get("name") or "-"),
        ("state", view["state"] + (f": {view['message']}" if view.get("message") else "")),
        ("exit code", code),
    ]
    if view["state"] == "QUEUED":
        lines.append(("queue", f"position {view.get('position') or '-'}: "
                               f"{jobtable.why(view)}"))
    for name, value in lines:
        click.echo(f"{name:<11}{value}")
    click.echo("members")
    for member in view["members"]:
        exit_code = member.get("exit_code")
        click.echo(f"  {member['id']:<14}{member['state']:<11}{member.get('host') or '-':<8}"
                   f"{'-' if exit_code is None else exit_code:<5}"
                   f"{shlex.join(member.get('argv') or [])}".rstrip())


# --- logs / wait / cancel -------------------------------------------------------------------


@click.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("-n", "--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Start with the last N lines of what the job has printed so far.")
@json_option
@url_option
def logs(job: str, follow: bool, tail: int | None, as_json: bool, url: str | None) -> None:
    """Print a job's output (its stdout and stderr, from the guest's console).

    With --json each piece of output is one JSON object a line, {"output": TEXT}.

    \b
    Examples:
      vmjob logs 3f9a1c2e
      vmjob logs -f --tail 20 3f9a        # a unique prefix of the id will do
    """
    client = client_for(url)

    def emit(text: str) -> None:
        sys.stdout.write(json.dumps({"output": text}) + "\n" if as_json else text)
        sys.stdout.flush()

    try:
        offset = 0
        if follow:
            say_if_queued(client.job(job))
        if tail is not None:
            text, offset = client.tail(job, tail)
            if text:
                emit(text)
            if not follow:
                return
        for chunk in client.logs(job, follow, offset):
            emit(chunk)
    finally:
        client.close()


def say_if_queued(view: dict[str, Any]) -> None:
    """One line on stderr when a job about to be followed has not started: where it waits
    and why, so that a `logs -f` printing nothing is not taken for a hang. Nothing for a
    job that runs or ended, nor for one the scheduler has not judged yet."""
    if view["state"] != "QUEUED" or view.get("position") is None:
        return
    why = view.get("waiting_because") or "waiting for room"
    click.echo(f"vmjob: job {view['id']} is queued at {jobtable.place_in_line(view)}: {why}; "
               "its output follows once it starts", err=True)


def recorded_output(view: dict[str, Any], client: Client) -> Path | None:
    """The --output the job was submitted with, only when the caller is the job's owner (as
    the daemon knows the caller: the socket's peer, or the ssh login).

    The path is the submitter's word: an admin waiting on another user's job must not write
    where that user chose (into a directory only the admin may write, say). Without
    --output, an admin's `wait` therefore writes nothing; the owner's writes with the
    owner's own permissions (this process), never the daemon's."""
    if not view.get("output"):
        return None
    if client.status()["you"]["uid"] != view.get("uid"):
        click.echo(f"vmjob: job {view['id']} is {view.get('owner')}'s: its output is not "
                   "written where they asked (give --output DIR to fetch it)", err=True)
        return None
    return Path(view["output"])


def report_end(view: dict[str, Any], client: Client, output: Path | None,
               quiet: bool = False) -> int:
    """Fetch the output when asked, say how a job ended unless it exited by itself; its code."""
    code = exit_code(view)
    delivered = ended_with_output(view)
    target = output or (recorded_output(view, client) if delivered else None)
    if target is not None and delivered:
        try:
            client.fetch_output(view["id"], target)
        except ApiFailure as exc:
            if exc.status != 404:
                raise
    if (line := end_line(view)) is not None and not quiet:
        click.echo(f"vmjob: {line}", err=True)
    return code


@click.command()
@click.argument("job")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), default=None,
              metavar="DIR", help="Write the job's /job/out here (default: the --output it "
                                  "was submitted with, if it is your job).")
@click.option("--timeout", default=None, metavar="DURATION",
              help=f"Give up waiting after this long (the job goes on): exit "
                   f"{EXIT_WAIT_EXPIRED}.")
@json_option
@url_option
def wait(job: str, output_dir: Path | None, timeout: str | None, as_json: bool,
         url: str | None) -> int:
    """Wait for a job to end; exit with its exit code.

    Exit codes: the job's own; 124 when its time limit stopped it; 125 when it left no exit
    status (output refused, guest died, host lost); 130 when cancelled; 75 when it gave up
    waiting to start (--wait-timeout); 3 when --timeout passed first (the job has not
    ended; with --json, "finished": false). A gang's id waits for every member and exits
    with the code of the first member that failed, else 0 (docs/multinode.md).

    \b
    Examples:
      vmjob wait 3f9a1c2e
      vmjob wait 3f9a1c2e --output ./results
      vmjob wait 3f9a --timeout 10m || echo "not done yet"
    """
    # imported here: the spec module (and placement's types) only when a --timeout is given,
    # so a plain wait stays a thin client (tests/unit/test_thin_client.py)
    limit = None
    if timeout is not None:
        from vmjobs.cli.options import duration_value

        limit = duration_value(timeout, "--timeout")
    client = client_for(url)
    try:
        view = client.wait(job, timeout=limit)
        if as_json:
            click.echo(json.dumps(view, indent=2))
        if not view.get("finished"):
            if not as_json:
                # a bare number is seconds: "after 2" alone reads as a count
                shown = f"{timeout}s" if timeout and timeout.strip().replace(".", "", 1)\
                    .isdigit() else timeout
                click.echo(f"vmjob: job {view['id']} has not ended after {shown} "
                           f"({view['state']})", err=True)
            return EXIT_WAIT_EXPIRED
        return report_end(view, client, output_dir, quiet=as_json)
    finally:
        client.close()


@click.command()
@click.argument("jobs", nargs=-1, metavar="[JOB|ARRAY]...")
@click.option("--state", "states", multiple=True, metavar="STATE[,STATE]",
              help="Only jobs in these states (QUEUED, RUNNING, CHECKPOINTED, ...; "
                   "repeatable).")
@click.option("--user", default=None, metavar="NAME",
              help="Only this user's jobs (other users' for administrators only).")
@json_option
@url_option
def cancel(jobs: tuple[str, ...], states: tuple[str, ...], user: str | None, as_json: bool,
           url: str | None) -> int:
    """Cancel jobs: queued ones leave the queue, running ones have their guest destroyed.

    Name jobs, or arrays (all their jobs), or select with --state / --user: one call to the
    daemon however many jobs match. Without names the filters apply to your own jobs
    (administrators: everyone's). Returns once each job has ended and released what it held.
    A filter that matches nothing says so and exits 0 (as scancel); a named job that does not
    exist, is not yours or has ended exits 1.

    \b
    Examples:
      vmjob cancel 3f9a1c2e
      vmjob cancel 5b7d0e11            # the whole array 5b7d0e11 (jobs 5b7d0e11_N)
      vmjob cancel --state QUEUED
      vmjob cancel --user alice --state RUNNING --json     # admins
    """
    wanted = [s.strip() for group in states for s in group.split(",") if s.strip()]
    if not jobs and not wanted and user is None:
        raise click.UsageError("name jobs or arrays to cancel, or give --state / --user")
    body: dict[str, Any] = {"jobs": list(jobs)} if jobs else {}
    if wanted:
        body["states"] = wanted
    if user is not None:
        body["user"] = user
    client = client_for(url)
    try:
        answer = client.cancel_many(body)
    except ApiFailure as exc:
        if exc.code == "usage":
            raise click.UsageError(str(exc)) from None
        raise
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        for done in answer["cancelled"]:
            click.echo(f"job {done['id']}: {done['state']}")
        if not answer["cancelled"] and not answer["errors"]:
            click.echo("no job matched" + ("" if jobs else " (nothing cancelled)"))
    for error in answer["errors"]:
        click.echo(f"vmjob: {error['error']}", err=True)
    return 1 if answer["errors"] else 0
