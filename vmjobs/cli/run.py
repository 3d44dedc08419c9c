"""`vmjob run`: run one job in its own guest and exit with its exit code."""

from __future__ import annotations

from pathlib import Path

import click

from vmjobs.cli.options import build_request, job_options, parse_env, parse_timeout
from vmjobs.runner import RunRequest
from vmjobs.runner import run as run_job


@click.command(context_settings={"ignore_unknown_options": False})
@job_options
@click.argument("argv", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.pass_obj
def run(obj: object, cpus: int, memory: str, nics: int, numa: str, host: str | None,
        image: str, input_dir: Path | None, output_dir: Path | None, env: tuple[str, ...],
        timeout: str | None, argv: tuple[str, ...]) -> int:
    """Run CMD in a new guest with dedicated cpus; stream its output; exit with its code.

    Exit codes: the job's own; 124 when --timeout stopped it; 125 when the guest gave no exit
    status or its output was refused; 130/143 when interrupted (the guest is destroyed and
    everything released); 1 for errors before the job started.

    \b
    Examples:
      vmjob run -- uname -a
      vmjob run --cpus 2 --mem 1G --input ./data --output ./results -- ./simulate
      vmjob run --nics 2 --numa strict --timeout 2h -- ./bench.sh
    """
    job = RunRequest(
        argv=argv,
        request=build_request(cpus, memory, nics, numa, host),
        env=parse_env(env),
        input_dir=input_dir,
        output_dir=output_dir,
        timeout_s=parse_timeout(timeout),
        image=image,
    )

    def write(line: str) -> None:
        click.echo(line)

    def note(message: str) -> None:
        click.echo(f"vmjob: {message}", err=True)

    return run_job(click.get_current_context().obj.config, job, write, note)
