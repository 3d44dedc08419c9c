"""Option bundles shared by the commands that describe a job (run now; submit later)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from placement import NumaPolicy, Request
from vmjobs.errors import VmjobsError
from vmjobs.units import parse_duration, parse_size_mib

DEFAULT_MEMORY = "256M"


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--cpus", type=click.IntRange(min=1), default=1, show_default=True,
                     help="vCPUs, each pinned to its own host cpu."),
        click.option("--mem", "memory", default=DEFAULT_MEMORY, show_default=True,
                     metavar="SIZE", help="Guest memory: 512M, 1.5G, 64G or bytes."),
        click.option("--nics", type=click.IntRange(min=0, max=16), default=0,
                     help="NICs passed through to the job ($NIC0.. in its environment)."),
        click.option("--numa", type=click.Choice([p.value for p in NumaPolicy]),
                     default=NumaPolicy.PREFER.value, show_default=True,
                     help="strict: cpus, memory and NICs on one NUMA node; prefer: one node "
                          "when possible; any: may span nodes."),
        click.option("--host", default=None, metavar="NAME", help="Run on this host only."),
        click.option("--image", default="default", show_default=True, metavar="NAME",
                     help="Guest image name or id (see 'vmjob image list')."),
        click.option("--input", "input_dir", type=click.Path(path_type=Path), default=None,
                     metavar="DIR", help="Copied into the guest as /job, the working directory."),
        click.option("--output", "output_dir", type=click.Path(path_type=Path), default=None,
                     metavar="DIR", help="Where the job's /job/out is written at the end."),
        click.option("--env", "env", multiple=True, metavar="K=V",
                     help="Environment variable for the job (repeatable)."),
        click.option("--timeout", default=None, metavar="DURATION",
                     help="Stop the job after this long (90, 30s, 5m, 2h)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise VmjobsError(f"invalid --env {pair!r}: use NAME=VALUE")
        env[name] = value
    return env


def build_request(cpus: int, memory: str, nics: int, numa: str, host: str | None) -> Request:
    return Request(cpus=cpus, memory_mib=parse_size_mib(memory, "--mem"), nics=nics,
                   numa=NumaPolicy(numa), host=host)


def parse_timeout(timeout: str | None) -> float | None:
    return parse_duration(timeout, "--timeout") if timeout is not None else None
