"""`vmjob reserve` and `vmjob release`: hold cores, memory and NICs without a guest, run jobs
inside them (`run|submit --reservation R --key K`), give them back.

Through the daemon only (the hold lives there). Without `--duration` the reservation lasts as
long as this command's connection: it holds until Enter or Ctrl+D (`--interactive`), Ctrl+C
or SIGTERM, then releases and exits; a `kill -9` closes the connection and the daemon
releases it then.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from vmjobs import holdspec
from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.options import job_options, spec_from_options
from vmjobs.cli.output import json_option
from vmjobs.cli.submit import NotStarted
from vmjobs.client import ApiFailure, Client, NoDaemon
from vmjobs.errors import VmjobsError
from vmjobs.interrupt import Interrupted, interruptible
from vmjobs.outcome import EXIT_NOT_STARTED, interrupted_exit
from vmjobs.spec import SpecError

KEY_HELP = ("The reservation's key; jobs inside it and its release then need it, even from "
            "its owner ($VMJOB_KEY, so that it stays out of the process list).")


def note(message: str) -> None:
    click.echo(f"vmjob: {message}", err=True)


def needs_daemon(client: Client, what: str) -> None:
    """Fail with one line unless a daemon answers (a reservation lives in the daemon)."""
    try:
        client.status()
    except NoDaemon as exc:
        raise NoDaemon(f"{what} needs the daemon (vmjob serve): {exc}") from None


@click.command()
@job_options
@click.option("--key", default=None, envvar="VMJOB_KEY", metavar="KEY", help=KEY_HELP)
@click.option("--duration", default=None, metavar="DURATION",
              help="Hold this long (2h, 90m, 1:30:00), then release (jobs inside are stopped "
                   "first). Without it the reservation lasts while this command runs.")
@click.option("--priority", default=None, metavar="N",
              help="Higher is held first; FIFO within a priority.  [default: 0]")
@click.option("--wait-timeout", default=None, metavar="DURATION",
              help=f"Give up if it is not held after this long (exit {EXIT_NOT_STARTED}).")
@click.option("--no-wait", is_flag=True,
              help=f"Fail at once (exit {EXIT_NOT_STARTED}) unless it can be held now.")
@click.option("-i", "--interactive", is_flag=True,
              help="Hold until Enter or Ctrl+D on stdin (or Ctrl+C, SIGTERM), then release.")
@url_option
@json_option
def reserve(as_json: bool, key: str | None, duration: str | None, interactive: bool,
            **params: Any) -> int:
    """Hold cpus, memory and NICs without a guest; print the reservation's id.

    It waits in the daemon's queue like a job. Run jobs inside it with 'vmjob run
    --reservation R -- CMD' (one after another, or side by side while they fit inside it).
    With --duration it is held that long and the command exits at once; without, it is held
    while this command runs (tied to its connection: Ctrl+C, SIGTERM, a closed SSH session or
    kill -9 release it). Exit codes: 0; 75 when --wait-timeout/--no-wait gave up; 77 for a
    wrong or missing key (release); 130/143 when Ctrl+C/SIGTERM released it.

    \b
    Examples:
      R=$(vmjob reserve --cpus 2 --nics 2 --numa strict --key "$K" --duration 2h)
      vmjob run --reservation "$R" --key "$K" --nics 2 -- sh -c 'echo $NIC0 $NIC1'
      vmjob release "$R" --key "$K"
      vmjob reserve --pool ci --cpus 1 --interactive    # held until Enter
    """
    if params.get("timeout") is not None:
        raise SpecError("--timeout is for jobs; a reservation is held for --duration")
    params["time_limit"] = duration
    spec = holdspec.check(spec_from_options(holdspec.with_no_command(params),
                                            params.pop("spec_file")))
    body = holdspec.to_body(spec)
    if key is not None:
        body["key"] = key
    if spec.time_limit is not None and interactive:
        raise SpecError("--interactive holds until Enter; it does not go with --duration")
    client = client_for(params["url"])
    try:
        needs_daemon(client, "vmjob reserve")
        return _hold(client, body, key, as_json, interactive, tied=spec.time_limit is None)
    finally:
        client.close()


def _reader(stream: Iterator[dict[str, Any]], inbox: queue.Queue[Any]) -> None:
    """Thread: the daemon's messages into `inbox`, then None (or the error that ended it)."""
    try:
        for message in stream:
            inbox.put(message)
        inbox.put(None)
    except BaseException as exc:  # noqa: BLE001 (handed to the main thread as is)
        inbox.put(exc)


def _stdin_ends(inbox: queue.Queue[Any]) -> None:
    """Thread: a line (Enter) or end of file (Ctrl+D) on stdin."""
    line = sys.stdin.readline()
    inbox.put("enter" if line else "eof")


def _hold(client: Client, body: dict[str, Any], key: str | None, as_json: bool,
          interactive: bool, tied: bool) -> int:
    inbox: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_reader, args=(client.reserve(body), inbox), daemon=True).start()
    seen: list[dict[str, Any]] = []  # its first view: what to withdraw on Ctrl+C meanwhile
    try:
        with interruptible():
            reservation = _until_held(inbox, seen)
            click.echo(json.dumps(reservation) if as_json else reservation["id"])
            sys.stdout.flush()
            if not tied:
                return 0
            if interactive:
                threading.Thread(target=_stdin_ends, args=(inbox,), daemon=True).start()
            while True:
                item = inbox.get()
                if item in ("enter", "eof"):
                    break
                if isinstance(item, dict) and item.get("state") not in ("HELD", None):
                    raise VmjobsError(f"reservation {item['id']} ended: {item['state']}"
                                      f" ({item.get('message') or 'by the daemon'})")
                if item is None or isinstance(item, BaseException):
                    raise VmjobsError(f"reservation {reservation['id']}: lost the daemon; it "
                                      "releases a reservation whose client is gone")
    except Interrupted as exc:
        if seen:
            _release_quietly(client, seen[0]["id"], key)
            note(f"reservation {seen[0]['id']} released ({exc.name})")
        return interrupted_exit(exc.signum)
    _release_quietly(client, reservation["id"], key)
    note(f"reservation {reservation['id']} released")
    return 0


def _until_held(inbox: queue.Queue[Any], seen: list[dict[str, Any]]) -> dict[str, Any]:
    """The reservation's view once HELD; its first view goes into `seen` (so an interrupt
    while waiting knows what to withdraw). Raises NotStarted (gave up) or VmjobsError."""
    told: tuple[Any, ...] | None = None
    while True:
        item = inbox.get()
        if isinstance(item, ApiFailure) and item.code == "not_started":
            raise NotStarted(str(item))  # --no-wait: exit 75, as for a job
        if isinstance(item, VmjobsError):
            raise item
        if isinstance(item, BaseException):  # never a traceback: one line
            raise VmjobsError(f"reading the daemon's answer failed: {type(item).__name__}: "
                              f"{item}")
        if item is None:
            raise VmjobsError("the daemon ended the reservation's stream before it was held")
        if not seen:
            seen.append(item)
        state = item["state"]
        if state == "HELD":
            return item
        if state == "QUEUED":
            position = (item.get("position"), item.get("waiting_because"))
            if position != told and item.get("position"):
                note(f"reservation {item['id']} waits at position {item['position']}: "
                     f"{item['waiting_because']}")
            told = position
            continue
        message = item.get("message") or state
        if state == "EXPIRED":
            raise NotStarted(f"reservation {item['id']}: {message}")
        raise VmjobsError(f"reservation {item['id']} ended before it was held: {message}")


def _release_quietly(client: Client, reservation_id: str, key: str | None) -> None:
    """Release on the way out; one that ended meanwhile (409) is fine."""
    try:
        client.release(reservation_id, key)
    except ApiFailure as exc:
        if exc.status != 409:
            raise


@click.command()
@click.argument("reservation")
@click.option("--key", default=None, envvar="VMJOB_KEY", metavar="KEY", help=KEY_HELP)
@click.option("--force", is_flag=True,
              help="Administrators: release without the key (jobs inside are stopped).")
@url_option
@json_option
def release(reservation: str, key: str | None, force: bool, url: str | None,
            as_json: bool) -> None:
    """Give a held reservation back; jobs still inside it are stopped first.

    Exit codes: 0; 77 for a wrong or missing key; 1 for another refusal.

    \b
    Examples:
      vmjob release r3f09a1c2 --key "$K"
      VMJOB_KEY=$K vmjob release r3f09a1c2
      vmjob release --force r3f09a1c2     # administrators
    """
    client = client_for(url)
    try:
        needs_daemon(client, "vmjob release")
        view = client.release(reservation, key, force)
    finally:
        client.close()
    click.echo(json.dumps(view, indent=2) if as_json else
               f"reservation {view['id']}: {view['state']}")
