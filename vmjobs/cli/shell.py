"""`vmjob shell`: an interactive shell (or command) in a new guest, on a real terminal; and
`vmjob attach`: the console of a job that runs.

The shell is `vmjob run` with a terminal (`spec.stdin = "tty"`, `vmjobs.console`): the same
spec options, queue, time limit, exit code and both modes (daemon or direct), its input from
this terminal in raw mode (`vmjobs.terminal`) through the guest's input port to a
pseudo-terminal there (images/vmjob-console.c).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from vmjobs.cli.connect import client_for, url_option
from vmjobs.cli.jobs import report_end
from vmjobs.cli.options import job_options, spec_from_options
from vmjobs.cli.run import execute, note, write_out
from vmjobs.cli.submit import reservation_options
from vmjobs.console import DETACH_KEY
from vmjobs.errors import VmjobsError
from vmjobs.interrupt import Interrupted, interruptible
from vmjobs.spec import check_paths
from vmjobs.terminal import TerminalInput

DEFAULT_SHELL = ("sh",)  # busybox's ash in the default image
DEFAULT_TERM = "vt100"  # what the guest assumes when this terminal names none


@click.command()
@job_options
@click.option("--url", default=None, metavar="URL", envvar="VMJOBS_URL",
              help="The daemon: unix:///path/to/vmjobs.sock or ssh://user@head (default: "
                   "$VMJOBS_URL, else the config's socket if a daemon answers there).")
@reservation_options
@click.argument("argv", nargs=-1, metavar="[-- CMD [ARG...]]")
@click.pass_context
def shell(ctx: click.Context, **params: Any) -> int:
    """An interactive shell (or CMD) in a new guest, on this terminal.

    The terminal is in raw mode while the session lasts: every key goes to the guest, Ctrl+C
    interrupts the guest's foreground command (not vmjob), and window size changes follow.
    The session ends when the shell exits (vmjob shell exits with its code), when --timeout
    passes (exit 124, with a line saying so) or on SIGTERM/SIGHUP (the job is cancelled); the
    terminal is restored in every case. $TERM is passed on (default vt100).

    Exit codes: the shell's own; 124 when --timeout stopped it; 125 when the guest gave no
    exit status; 130/143 when vmjob was interrupted; 2 for a bad option; 1 for other errors.

    \b
    Examples:
      vmjob shell
      vmjob shell --cpus 2 --mem 1G --timeout 1h
      vmjob shell --input ./src -- sh -c 'cd /job && exec sh'
      vmjob shell --url ssh://me@head --host node3
      vmjob shell --profile 2nic --timeout 1h
      vmjob shell --reservation "$R" --key "$K"    # inside 'vmjob reserve'
    """
    reservation, key = params.pop("reservation"), params.pop("key")
    if not params.get("argv"):
        params["argv"] = DEFAULT_SHELL
    spec = spec_from_options(params, params.pop("spec_file"))
    env = dict(spec.env)
    env.setdefault("TERM", os.environ.get("TERM") or DEFAULT_TERM)
    spec = dataclasses.replace(spec, stdin="tty", env=env)
    check_paths(spec)
    code, _ended = execute(ctx.obj.config, spec, params["url"], write_out, (reservation, key))
    return code


@click.command()
@click.argument("job")
@url_option
def attach(job: str, url: str | None) -> int:
    """Attach to a running job's console: its output from now on and, for a job started
    with 'vmjob run -i' or 'vmjob shell', this terminal's input.

    Detach with Ctrl+] (the job goes on; attach again later); Ctrl+C also detaches when the
    job has no terminal. If the job ends while attached, attach exits with its code. Needs
    the daemon (a direct 'vmjob run' is followed by its own process). Users attach to their
    own jobs, administrators to all.

    \b
    Examples:
      vmjob attach 3f9a1c2e
      vmjob attach 3f9a --url ssh://me@head
    """
    client = client_for(url)
    try:
        view = client.job(job)
        job_id, mode = view["id"], view.get("stdin")
        if view.get("finished") or view["state"] in ("COMPLETED", "FAILED", "CANCELLED",
                                                      "TIMEOUT", "LOST", "EXPIRED"):
            raise VmjobsError(f"job {job_id} has ended ({view['state']}); see "
                              f"'vmjob logs {job_id}'")
        link = client.console(job_id, with_input=mode is not None, from_end=True)
        terminal = TerminalInput(tty_job=mode == "tty", detach_key=DETACH_KEY,
                                 on_detach=link.close)
        keys = "Ctrl+] detaches" if mode == "tty" else "Ctrl+] or Ctrl+C detaches"
        note(f"attached to job {job_id} ({keys})")
        interrupted = False
        try:
            with terminal, interruptible():
                if mode is not None:
                    terminal.start(link.send)
                for chunk in link.output():
                    os.write(1, chunk)
        except Interrupted:
            interrupted = True
        finally:
            link.close()
        if interrupted or terminal.detached.is_set():
            note(f"detached from job {job_id}; it goes on ('vmjob attach {job_id}' again)")
            return 0
        return report_end(client.wait(job_id), client, None)
    finally:
        client.close()
