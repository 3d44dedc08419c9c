"""Option bundles shared by the commands that describe a job (`run`, `submit`), and the one
way their values (with `-f job.yaml`) become a checked `vmjobs.spec.Spec`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from vmjobs.errors import VmjobsError
from vmjobs.spec import (
    DEFAULT_MEMORY_MIB,
    HUGEPAGE_KIB,
    MAX_DURATION_S,
    Profile,
    Spec,
    SpecError,
    make_profile,
    parse,
)
from vmjobs.units import parse_duration

# spec field -> the click parameter that gives it on the command line
PARAMS = {"name": "name", "cpus": "cpus", "mem": "memory", "nics": "nics", "numa": "numa",
          "threads": "threads", "hugepages": "hugepages", "mem_nodes": "mem_nodes",
          "labels": "label", "host": "host",
          "pool": "pool", "image": "image", "input": "input_dir", "output": "output_dir",
          "env": "env", "priority": "priority", "preemptible": "preemptible",
          "wait_timeout": "wait_timeout", "no_wait": "no_wait", "array": "array",
          "nodes": "nodes", "per_host": "per_host", "on_member_failure": "on_member_failure",
          "profile": "profile", "borrow": "borrow", "no_lend": "no_lend"}
# click gives these as booleans
FLAGS = frozenset({"preemptible", "no_wait", "mem_nodes", "borrow", "no_lend"})


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    # Values stay text here: `vmjobs.spec` checks them, so an option, a YAML field and an API
    # field refuse the same value with the same line (exit 2).
    options = [
        click.option("-f", "--file", "spec_file", type=click.Path(path_type=Path),
                     default=None, metavar="JOB.YAML",
                     help="Read the job spec from YAML (fields as in docs/user-guide.md; "
                          "options given here win)."),
        click.option("-J", "--name", default=None, metavar="NAME",
                     help="A name for the job, shown by 'vmjob list' and 'show' and matched "
                          "by 'list --name' (printable, at most 100 characters; need not be "
                          "unique)."),
        click.option("--profile", default=None, metavar="NAME",
                     help="Start from this hardware profile of the config (see 'vmjob "
                          "profiles'); the options given with it win."),
        click.option("--cpus", default=None, metavar="N",
                     help="vCPUs, each pinned to its own host cpu.  [default: 1]"),
        click.option("--mem", "memory", default=None, metavar="SIZE",
                     help=f"Guest memory: 512M, 1.5G, 64G or bytes.  "
                          f"[default: {DEFAULT_MEMORY_MIB}M]"),
        click.option("--nics", default=None, metavar="N",
                     help="NICs passed through to the job ($NIC0.. in its environment)."),
        click.option("--numa", default=None, metavar="strict|prefer|any",
                     help="strict: cpus, memory and NICs on one NUMA node; prefer: one node "
                          "when possible; any: may span nodes.  [default: prefer]"),
        click.option("--threads", default=None, metavar="dedicated|isolate",
                     help="isolate: keep the SMT siblings of the job's cpus idle too.  "
                          "[default: dedicated]"),
        click.option("--hugepages", default=None, metavar="|".join(HUGEPAGE_KIB),
                     help="Back guest memory with hugepages of this size (the host must "
                          "have them free on the job's node)."),
        click.option("--mem-nodes", "mem_nodes", is_flag=True,
                     help="Memory-only NUMA nodes (CXL, HBM) may supply the memory the nodes "
                          "of the job's cpus lack (--numa prefer or any)."),
        click.option("--label", "label", multiple=True, metavar="K=V",
                     help="Run only on hosts carrying this label (repeatable; see the "
                          "config's hosts[].labels)."),
        click.option("--host", default=None, metavar="NAME", help="Run on this host only."),
        click.option("--pool", default=None, metavar="NAME",
                     help="Run on a host of this pool only."),
        click.option("--image", default=None, metavar="NAME",
                     help="Guest image name or id (see 'vmjob image list').  "
                          "[default: default]"),
        click.option("--input", "input_dir", type=click.Path(path_type=Path), default=None,
                     metavar="DIR", help="Copied into the guest as /job, the working directory."),
        click.option("--output", "output_dir", type=click.Path(path_type=Path), default=None,
                     metavar="DIR", help="Where the job's /job/out is written at the end."),
        click.option("--env", "env", multiple=True, metavar="K=V",
                     help="Environment variable for the job (repeatable)."),
        click.option("--timeout", default=None, metavar="DURATION",
                     help="Stop the job after this long (90 seconds, 30s, 5m, 2h, 1:30:00, "
                          "2-12:00:00; at most 366d)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def gang_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that make a job a gang of guests (docs/multinode.md)."""
    options = [
        click.option("--nodes", default=None, metavar="N",
                     help="A gang: N guests of this spec, started together or not at all, "
                          "with $VMJOB_NODE (0..N-1) and $VMJOB_NODES; members are JOB.0 .. "
                          "JOB.N-1 (-f job.yaml 'nodes:' gives each its own cmd and shape)."),
        click.option("--nodes-apart", "nodes_apart", is_flag=True,
                     help="Members on distinct hosts (the default for a gang)."),
        click.option("--nodes-together", "nodes_together", is_flag=True,
                     help="Members may share hosts."),
        click.option("--per-host", "per_host", default=None, metavar="K",
                     help="With members apart: at most K of them on one host.  [default: 1]"),
        click.option("--on-member-failure", "on_member_failure", default=None,
                     metavar="stop|continue",
                     help="When a member fails (non-zero exit, lost host, time limit): stop "
                          "the others (stop) or let them run (continue).  [default: stop]"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def duration_value(text: str | None, option: str) -> float | None:
    """A duration option that is not a spec field (`wait --timeout`, `migrate --timeout`):
    seconds, None when not given. Raises SpecError (a usage error, exit 2) as the spec's own
    duration fields do, with the same bound."""
    if text is None:
        return None
    try:
        seconds = parse_duration(text, option)
    except VmjobsError as exc:
        raise SpecError(str(exc)) from None
    if seconds > MAX_DURATION_S:
        raise SpecError(f"{option} {text!r} is longer than the longest supported "
                        f"({MAX_DURATION_S // 86400}d)")
    return seconds


def read_spec_file(path: Path) -> dict[str, Any]:
    """A job.yaml: spec fields with their YAML types; relative `input`/`output` paths are
    relative to the file. Field checks are `parse`'s."""
    import yaml  # only with -f: a plain `vmjob submit` does not pay for the YAML parser

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"-f {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise SpecError(f"-f {path}: not valid YAML") from None
    if not isinstance(data, dict):
        raise SpecError(f"-f {path}: must be a mapping of spec fields")
    for key in ("input", "output"):
        if isinstance(data.get(key), str) and data[key]:
            data[key] = str(path.parent / data[key])
    return data


def spec_from_options(params: dict[str, Any], spec_file: Path | None = None) -> Spec:
    """The checked spec from a command's parameters over `-f` (options given win).

    Raises SpecError (exit 2) on the first bad value.
    """
    fields: dict[str, Any] = read_spec_file(spec_file) if spec_file is not None else {}
    typed = set(fields)
    for name, param in PARAMS.items():
        value = params.get(param)
        if value is None or value == () or value is False:
            continue  # not given here: -f's value (if any) or the default stands
        fields[name] = str(value) if isinstance(value, Path) else value
        if name in FLAGS:
            typed.add(name)
        else:
            typed.discard(name)
    limits = {o: params.get(p) for o, p in (("--timeout", "timeout"),
                                            ("--time-limit", "time_limit"))
              if params.get(p) is not None}
    if len(limits) == 2 and len(set(limits.values())) == 2:
        raise SpecError("--timeout and --time-limit are the same limit; give one")
    names: dict[str, str] = {}
    if limits:
        option, fields["time_limit"] = next(iter(limits.items()))
        typed.discard("time_limit")
        names["time_limit"] = option
    if params.get("nodes_apart") and params.get("nodes_together"):
        raise SpecError("give either --nodes-apart or --nodes-together, not both")
    if params.get("nodes_apart") or params.get("nodes_together"):
        fields["nodes_apart"] = bool(params.get("nodes_apart"))
        typed.add("nodes_apart")
    if params.get("argv"):
        fields["argv"] = tuple(params["argv"])
    profiles = profiles_for(params.get("url")) if fields.get("profile") is not None else None
    return parse(fields, typed=frozenset(typed),
                 source=f"-f {spec_file}" if spec_file is not None else "", options=names,
                 profiles=profiles)


def profiles_for(url: str | None) -> Mapping[str, Profile]:
    """The hardware profiles a command's `--profile` names: the daemon's at --url /
    $VMJOBS_URL (`GET /v1/profiles`; a remote user has no config), else the config's (the
    one the daemon on this machine reads too; the daemon applies its own again, which only
    fills what is still unset)."""
    if not url:
        return click.get_current_context().obj.config.profiles
    from vmjobs.cli.connect import client_for

    client = client_for(url)
    try:
        listed = client.profiles()
    finally:
        client.close()
    return {p["name"]: make_profile(p["name"], {k: v for k, v in p.items()
                                                if k not in ("name", "hosts")})
            for p in listed}
