"""The job spec: what to run and what it needs, parsed and checked once, the same way for the
command line (`vmjob run|submit` options), `-f job.yaml` and the API (`POST /v1/jobs`).

One set of field names everywhere (docs/user-guide.md, docs/api.md):

- `argv`: list of strings (command line: `-- CMD [ARG...]`)
- `env`, `labels`: map name -> string (`--env NAME=VALUE`, `--label NAME=VALUE`, repeatable);
  `labels` are the labels the host must carry
- `cpus`, `nics`, `priority`: integers
- `mem`: a size (`"512M"`, `"1.5G"`) or an integer number of bytes
- `numa` (`strict|prefer|any`), `threads` (`dedicated|isolate`), `hugepages` (`2M|1G`)
- `host`, `pool`, `image`: strings
- `name`: a job name for people (`--name`, `-J`): printable, at most 100 characters
- `preemptible`, `no_wait`, `mem_nodes`: true / false (`--preemptible`, `--no-wait`,
  `--mem-nodes`: memory-only NUMA nodes, CXL or HBM, may supply memory)
- `borrow`, `no_lend`: true / false (`--borrow`: may run on cores other jobs hold and leave
  idle, implies preemptible; `--no-lend`: this job's idle cores are never lent;
  docs/borrowing.md)
- `time_limit` (`--time-limit` or `--timeout`), `wait_timeout`: a duration (`"90s"`, `"2h"`)
  or a number of seconds
- `input`, `output`: paths (at the API `input` is an upload token)
- `on_host_loss` (`fail|requeue|restore`, `--on-host-loss`) and `checkpoint_every` (a
  duration, `--checkpoint-every`): what becomes of the job when its host is declared lost
  (`vmjobs.jobs.HostLossPolicy`, docs/borrowing.md "Lost hosts"); periodic checkpoints are
  taken for `restore` only
- `stdin`: `pipe` (`vmjob run -i`: the client's stdin is the job's) or `tty` (`vmjob shell`:
  a terminal in the guest); absent: the job's stdin is empty (vmjobs/console.py)
- `array`: job array indices, `"1-100"`, `"1,3,5-7"`, `"0-99%10"` (`--array`; one job per
  index, at most N running with `%N`; `vmjobs.jobarray`)
- `nodes`: a gang (`vmjobs.gang`, docs/multinode.md): a number N (`--nodes N`: N members of
  this spec) or a list of members, each a map of `name cmd cpus mem nics env host pool labels`
  laid over this spec (`cmd`: a list of strings, the member's own program);
  `nodes_apart` (default true: `--nodes-apart` / `--nodes-together`), `per_host` (at most
  this many members on one host when apart; default 1), `on_member_failure`
  (`stop|continue`, default stop); with `no_wait` every member starts in the submit's own
  scheduling pass or the gang is never created
- `profile`: the name of a hardware profile of the config (`--profile`): its fields (cpus,
  mem, nics, numa, threads, hugepages, pool, labels) stand wherever the spec gives none;
  labels are merged, the spec's winning per name. The name is kept on the job (usage by
  profile).

Types are strict: a boolean is `true`/`false`, never the string "no"; a number is never NaN
or infinite; no string carries a NUL byte. Every refusal is a `SpecError`: one line, exit 2,
HTTP 400 at the API.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement import NumaPolicy, Request, ThreadPolicy
from placement.need import need_of
from vmjobs.console import STDIN_MODES
from vmjobs.errors import UsageError, VmjobsError
from vmjobs.gang import ENV_NODE, ENV_NODES, MAX_NODES, ON_FAILURE
from vmjobs.jobarray import ENV_ID, ENV_INDEX, ArrayError, JobArray, parse_array
from vmjobs.jobs import HostLossPolicy
from vmjobs.units import parse_duration, parse_size_mib

# The smallest guest known to boot the image (kernel + initramfs unpacked in RAM): 128 MiB
# guests run in the multi-host tests; a 64 MiB one stopped before its first console line.
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 1 << 30  # 1 PiB: beyond any host; keeps the arithmetic finite
MAX_CPUS = 4096
MAX_NICS = 16
MAX_PRIORITY = 1_000_000
# The longest time limit or wait: far past any job, far below what a timer can wait for
# (threading's TIMEOUT_MAX; `--time-limit 300000d` once killed the scheduler thread).
MAX_DURATION_S = 366 * 86400
MAX_NAME_CHARS = 100  # fits a table column and a log line; Slurm allows more, nobody reads it
HUGEPAGE_KIB = {"2M": 2048, "1G": 1 << 20}
DEFAULT_MEMORY_MIB = 256
RESERVED_ENV = ("VMJOB_ID", "VMJOB_CPUS", "VMJOB_MEM", ENV_ID, ENV_INDEX, ENV_NODE, ENV_NODES)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-/]*$")

FIELDS = ("argv", "name", "env", "cpus", "mem", "nics", "numa", "threads", "hugepages", "mem_nodes",
          "labels", "host", "pool", "image", "priority", "preemptible", "time_limit",
          "wait_timeout", "no_wait", "input", "output", "array", "profile", "nodes",
          "nodes_apart", "per_host", "on_member_failure", "borrow", "no_lend", "on_host_loss",
          "checkpoint_every", "stdin")
# what a member of `nodes:` may set for itself (`cmd` is its argv)
MEMBER_FIELDS = ("name", "cmd", "cpus", "mem", "nics", "env", "host", "pool", "labels")
# the fields a hardware profile may set (config `profiles:`, `--profile`)
PROFILE_FIELDS = ("cpus", "mem", "nics", "numa", "threads", "hugepages", "pool", "labels")
# names used before this spec existed (YAML, API, store): a refusal names the new one
RENAMED = {"command": "argv", "memory_mib": "mem", "memory": "mem", "timeout": "time_limit",
           "time_limit_s": "time_limit", "timeout_s": "time_limit",
           "wait_timeout_s": "wait_timeout", "label": "labels"}
# the command-line option of each field, for messages about values typed there
OPTIONS = {"argv": "the command", "no_wait": "--no-wait", "time_limit": "--time-limit",
           "wait_timeout": "--wait-timeout", "labels": "--label", "array": "--array",
           "nodes": "--nodes", "per_host": "--per-host", "nodes_apart": "--nodes-apart",
           "on_member_failure": "--on-member-failure", "no_lend": "--no-lend",
           "on_host_loss": "--on-host-loss", "checkpoint_every": "--checkpoint-every"}
# Periodic checkpoints pause the guest while its memory is written (about a second for a
# small TCG guest here): more often than this would spend the job's time on checkpoints.
MIN_CHECKPOINT_EVERY_S = 5.0
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class SpecError(UsageError):
    """A job spec that is refused: one line, a usage error (exit 2; HTTP 400)."""


@dataclass(frozen=True)
class Spec:
    """A checked job spec. Units: `mem` MiB, `time_limit`/`wait_timeout` seconds."""

    argv: tuple[str, ...]
    name: str | None = None  # for people and filters (`list --name`); not unique
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: int = 1
    mem: int = DEFAULT_MEMORY_MIB
    nics: int = 0
    numa: NumaPolicy = NumaPolicy.PREFER
    threads: ThreadPolicy = ThreadPolicy.DEDICATED
    hugepages: str | None = None  # a key of HUGEPAGE_KIB
    mem_nodes: bool = False  # memory-only nodes (CXL, HBM) may supply memory
    labels: Mapping[str, str] = field(default_factory=dict)
    host: str | None = None
    pool: str | None = None
    image: str = "default"
    priority: int = 0
    preemptible: bool = False
    time_limit: float | None = None
    wait_timeout: float | None = None
    no_wait: bool = False
    input: str | None = None
    output: str | None = None
    array: JobArray | None = None
    on_host_loss: HostLossPolicy = HostLossPolicy.FAIL
    checkpoint_every: float | None = None  # seconds; only with on_host_loss restore
    profile: str | None = None  # the hardware profile it was built from (already applied)
    stdin: str | None = None  # None | "pipe" | "tty" (vmjobs.console.STDIN_MODES)
    borrow: bool = False  # may run on lent cores (docs/borrowing.md); implies preemptible
    no_lend: bool = False  # its idle cores are never lent
    # a gang: one map of overrides per member (`--nodes N`: N empty maps), checked
    nodes: tuple[Mapping[str, Any], ...] | None = None
    nodes_apart: bool = True
    per_host: int | None = None  # None: 1 when apart
    on_member_failure: str = "stop"

    def members(self) -> list[Spec]:
        """Each member's own spec (this spec with its overrides laid over, no `nodes`), by
        index; [] for a job that is no gang."""
        if self.nodes is None:
            return []
        base = {k: v for k, v in self.to_dict().items()
                if k not in ("nodes", "nodes_apart", "per_host", "on_member_failure")}
        out = []
        for i, overrides in enumerate(self.nodes):
            mine = {("argv" if k == "cmd" else k): v for k, v in overrides.items()}
            out.append(parse({**base, **mine}, source=f"nodes[{i}]"))
        return out

    def host_limit(self) -> int | None:
        """At most this many members on one host (None: no limit, `--nodes-together`)."""
        if not self.nodes_apart:
            return None
        return self.per_host or 1

    def request(self) -> Request:
        """What the placement engine is asked for."""
        return Request(cpus=self.cpus, memory_mib=self.mem, nics=self.nics, numa=self.numa,
                       threads=self.threads,
                       hugepage_kib=HUGEPAGE_KIB[self.hugepages] if self.hugepages else None,
                       host=self.host, pool=self.pool, labels=tuple(sorted(self.labels.items())),
                       priority=self.priority,
                       preemptible=self.preemptible or self.borrow,
                       mem_nodes=self.mem_nodes)

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form: what the CLI sends to the API and the store keeps.
        `parse(spec.to_dict()) == spec`. `profile` and `stdin` are left out when there is
        none, so a daemon older than them still takes the job."""
        data: dict[str, Any] = {
            "argv": list(self.argv), "name": self.name, "env": dict(self.env), "cpus": self.cpus,
            "mem": f"{self.mem}M", "nics": self.nics, "numa": self.numa.value,
            "threads": self.threads.value, "hugepages": self.hugepages,
            "mem_nodes": self.mem_nodes,
            "labels": dict(self.labels), "host": self.host, "pool": self.pool,
            "image": self.image, "priority": self.priority, "preemptible": self.preemptible,
            "time_limit": self.time_limit, "wait_timeout": self.wait_timeout,
            "no_wait": self.no_wait, "input": self.input, "output": self.output,
            "array": self.array.text() if self.array is not None else None,
            "borrow": self.borrow, "no_lend": self.no_lend,
            "on_host_loss": self.on_host_loss.value, "checkpoint_every": self.checkpoint_every,
        }
        if self.profile is not None:
            data["profile"] = self.profile
        if self.stdin is not None:
            data["stdin"] = self.stdin
        if self.nodes is not None:  # a gang's fields only for a gang
            data.update({
                "nodes": len(self.nodes) if not any(self.nodes)
                else [dict(n) for n in self.nodes],
                "nodes_apart": self.nodes_apart, "per_host": self.per_host,
                "on_member_failure": self.on_member_failure,
            })
        return data


@dataclass(frozen=True)
class Profile:
    """A named hardware profile (config `profiles:`): spec fields in their canonical JSON form
    (`Spec.to_dict`'s), only those the profile sets (a subset of PROFILE_FIELDS)."""

    name: str
    fields: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.fields)}


def make_profile(name: str, data: Mapping[str, Any]) -> Profile:
    """A profile from its YAML/JSON mapping, each value checked as the spec checks it.

    Raises SpecError (one line naming the field) on a bad name, an unknown field or a bad
    value."""
    if not isinstance(name, str) or not _PROFILE_NAME.match(name):
        raise SpecError(f"{name!r} is not a valid profile name (letters, digits, . _ -)")
    if not isinstance(data, Mapping):
        raise SpecError("must be a mapping of spec fields")
    unknown = sorted(set(map(str, data)) - set(PROFILE_FIELDS))
    if unknown:
        raise SpecError(f"unknown field(s) {', '.join(unknown)} (allowed: "
                        f"{', '.join(PROFILE_FIELDS)})")
    given = {k: v for k, v in data.items() if v is not None}
    checked = parse({"argv": ["true"], **given}).to_dict()
    return Profile(name, {k: checked[k] for k in PROFILE_FIELDS if k in given})


def apply_profile(data: Mapping[str, Any], typed: frozenset[str] | None,
                  profiles: Mapping[str, Profile]) -> tuple[dict[str, Any], frozenset[str]]:
    """`data` with its `profile`'s fields under it: a field the data gives (not None) wins;
    `labels` are merged (the data's win per name). Returns the merged data and the new set
    of typed fields (the profile's values are typed). Raises SpecError for an unknown
    profile."""
    typed = frozenset(data) if typed is None else typed
    name = data.get("profile")
    if name is None:
        return dict(data), typed
    if not isinstance(name, str) or name not in profiles:
        known = ", ".join(sorted(profiles)) or "none configured"
        raise SpecError(f"unknown profile {name!r} (profiles: {known}; see 'vmjob profiles')")
    merged = dict(data)
    added = set(typed)
    for key, value in profiles[name].fields.items():
        if key == "labels" and merged.get("labels") not in (None, {}, ()):
            given = _Fields(merged, typed, "", OPTIONS).pairs("labels", _label_name)
            merged["labels"] = {**value, **given}
            added.add("labels")
        elif merged.get(key) in (None, (), {}):
            merged[key] = value
            added.add(key)
    return merged, frozenset(added)


def parse(data: Mapping[str, Any], *, typed: frozenset[str] | None = None,
          source: str = "", options: Mapping[str, str] | None = None,
          profiles: Mapping[str, Profile] | None = None) -> Spec:
    """Check every field of `data` and build a `Spec`.

    Values of the fields named in `typed` (default: all) must have their JSON/YAML type; the
    others came from the command line as text (`"4"` for `cpus`, `("K=V",)` for `env`) and
    are named by their option in messages. `source` prefixes messages about typed values
    (e.g. "-f job.yaml"); `options` overrides the option names (e.g. `--timeout` for
    `time_limit`). With `profiles`, a `profile` field is applied (`apply_profile`); without,
    the name is only recorded (a stored spec has its profile applied already). Raises
    SpecError (one line) on the first problem.
    """
    typed = frozenset(data) if typed is None else typed
    unknown = sorted(set(map(str, data)) - set(FIELDS))
    if unknown:
        hints = [f"{k} (now: {RENAMED[k]})" if k in RENAMED else k for k in unknown]
        where = f"{source}: " if source else ""
        raise SpecError(f"{where}unknown field(s) {', '.join(hints)} (allowed: "
                        f"{', '.join(FIELDS)}; see docs/user-guide.md)")
    if profiles is not None:
        data, typed = apply_profile(data, typed, profiles)
    fields = _Fields(data, typed, source, {**OPTIONS, **(options or {})})
    no_wait = fields.flag("no_wait")
    wait_timeout = fields.duration("wait_timeout")
    if no_wait and wait_timeout is not None:
        raise SpecError("give either --no-wait or --wait-timeout, not both")
    array = fields.array()
    if data.get("stdin") is not None and (array is not None or data.get("nodes") is not None):
        raise SpecError("an interactive job (stdin) cannot be a job array or a gang")
    borrow, no_lend = fields.flag("borrow"), fields.flag("no_lend")
    if borrow and no_lend:
        raise SpecError("give either --borrow or --no-lend, not both (a borrower lends "
                        "nothing)")
    if no_wait and array is not None:
        raise SpecError("--no-wait cannot be given with --array (its jobs start as room "
                        "comes; use --wait-timeout)")
    on_host_loss = HostLossPolicy(fields.choice(
        "on_host_loss", [p.value for p in HostLossPolicy], HostLossPolicy.FAIL.value))
    checkpoint_every = fields.duration("checkpoint_every")
    if checkpoint_every is not None:
        if on_host_loss != HostLossPolicy.RESTORE:
            raise SpecError("--checkpoint-every needs --on-host-loss restore (the periodic "
                            "checkpoints are what a lost host's job is restored from)")
        if checkpoint_every < MIN_CHECKPOINT_EVERY_S:
            raise fields.fail("checkpoint_every", f"{checkpoint_every:g}s is shorter than "
                                                  f"the shortest allowed "
                                                  f"({MIN_CHECKPOINT_EVERY_S:g}s)")
    nodes = fields.nodes()
    if nodes is not None and array is not None:
        raise SpecError("--nodes cannot be given with --array (a gang is one job of N "
                        "guests; an array is many jobs)")
    apart = fields.flag("nodes_apart", default=True)
    per_host = fields.integer("per_host", 0, 1, MAX_NODES) or None
    if per_host is not None and not apart:
        raise SpecError("--per-host limits members per host when they are apart; it cannot "
                        "be given with --nodes-together")
    on_failure = fields.choice("on_member_failure", list(ON_FAILURE), "stop") or "stop"
    if nodes is None and (per_host is not None or "on_member_failure" in data
                          and data["on_member_failure"] is not None):
        raise SpecError(f"{'--per-host' if per_host is not None else '--on-member-failure'} "
                        "is for gangs: give --nodes N (or nodes: in the job file)")
    argv = fields.argv(gang=nodes is not None and all("cmd" in n for n in nodes))
    spec = Spec(
        argv=argv, name=fields.job_name(), env=fields.pairs("env", _env_name),
        cpus=fields.integer("cpus", 1, 1, MAX_CPUS), mem=fields.memory(), nics=fields.integer(
            "nics", 0, 0, MAX_NICS),
        numa=NumaPolicy(fields.choice("numa", [p.value for p in NumaPolicy],
                                      NumaPolicy.PREFER.value)),
        threads=ThreadPolicy(fields.choice("threads", [t.value for t in ThreadPolicy],
                                           ThreadPolicy.DEDICATED.value)),
        hugepages=fields.choice("hugepages", list(HUGEPAGE_KIB), None),
        mem_nodes=fields.flag("mem_nodes"),
        labels=fields.pairs("labels", _label_name), host=fields.text("host"),
        pool=fields.text("pool"), image=fields.text("image") or "default",
        priority=fields.integer("priority", 0, -MAX_PRIORITY, MAX_PRIORITY),
        preemptible=fields.flag("preemptible"), time_limit=fields.duration("time_limit"),
        wait_timeout=wait_timeout, no_wait=no_wait, input=fields.text("input"),
        output=fields.text("output"), array=array, profile=fields.text("profile"),
        stdin=fields.choice("stdin", list(STDIN_MODES), None),
        nodes=nodes, nodes_apart=apart, per_host=per_host, on_member_failure=on_failure,
        borrow=borrow, no_lend=no_lend,
        on_host_loss=on_host_loss, checkpoint_every=checkpoint_every,
    )
    # fields that contradict each other (--mem-nodes with --numa strict, a memory that is no
    # whole number of its hugepages): the engine's own line, as a usage error before anything
    # is connected to, not exit 1 as if no host had room
    problem = need_of(spec.request()).problem
    if problem is not None:
        raise SpecError(problem)
    if nodes is not None:
        _check_members(spec)
    return spec


def _check_members(spec: Spec) -> None:
    """Each member's spec is checked as a job's would be (a refusal names `nodes[i]`), and
    members kept apart cannot name one host more often than `per_host` allows."""
    members = spec.members()
    limit = spec.host_limit()
    if limit is not None:
        named: dict[str, int] = {}
        for member in members:
            if member.host is not None:
                named[member.host] = named.get(member.host, 0) + 1
        for host, count in sorted(named.items()):
            if count > limit:
                raise SpecError(f"nodes: {count} members name host {host}, but at most "
                                f"{limit} may share a host (--per-host; --nodes-together "
                                "lifts it)")


def check_paths(spec: Spec) -> None:
    """The local directories a command-line spec names (before anything is reserved)."""
    if spec.input is not None and not Path(spec.input).is_dir():
        raise SpecError(f"--input {spec.input}: not a directory")
    if spec.output is None:
        return
    output = Path(spec.output)
    if output.exists() and not output.is_dir():
        raise SpecError(f"--output {spec.output}: exists and is not a directory")
    if not output.exists():
        # it is made after the job: a path that can never be made (a file on the way, a
        # directory this user cannot write) would fail only once the job's work is done
        made_in = next(p for p in output.absolute().parents if p.exists())
        if not made_in.is_dir():
            raise SpecError(f"--output {spec.output}: cannot be made: {made_in} is not a "
                            "directory")
        if not os.access(made_in, os.W_OK | os.X_OK):
            raise SpecError(f"--output {spec.output}: cannot be made: {made_in} is not "
                            "writable")


def time_limit_of(stored: Mapping[str, Any]) -> float | None:
    """A stored spec's time limit in seconds (records written before the spec: `timeout_s`)."""
    value = stored.get("time_limit", stored.get("timeout_s"))
    return float(value) if value else None


def checkpoint_every_of(stored: Mapping[str, Any]) -> float | None:
    """A stored spec's periodic checkpoint interval in seconds; None without one (or for a
    value that is not a positive number: records are checked at submission)."""
    value = stored.get("checkpoint_every")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def wait_timeout_of(stored: Mapping[str, Any]) -> float | None:
    value = stored.get("wait_timeout", stored.get("wait_timeout_s"))
    return float(value) if value is not None else None


def _env_name(name: str) -> str | None:
    if not _ENV_NAME.match(name):
        return f"invalid --env name {name!r}: use letters, digits and _"
    if name in RESERVED_ENV or re.fullmatch(r"NIC\d+", name):
        return f"--env {name} is set by vmjob and cannot be overridden"
    return None


def _label_name(name: str) -> str | None:
    if not _LABEL_NAME.match(name):
        return f"invalid --label name {name!r}: use letters, digits and . _ - /"
    return None


class _Fields:
    """The per-field checks; each names the field as its source spells it."""

    def __init__(self, data: Mapping[str, Any], typed: frozenset[str], source: str,
                 options: Mapping[str, str]) -> None:
        self.data, self.typed, self.source, self.options = data, typed, source, options

    def name(self, key: str) -> str:
        if key in self.typed:
            return f"{self.source}: {key}" if self.source else key
        return self.options.get(key, "--" + key.replace("_", "-"))

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(f"{self.name(key)} {problem}")

    def _no_nul(self, key: str, value: str) -> str:
        if "\0" in value:
            raise self.fail(key, "contains a NUL byte")
        return value

    def argv(self, gang: bool = False) -> tuple[str, ...]:
        """The command; `gang`: every member has its own `cmd`, so none is needed here."""
        value = self.data.get("argv")
        if gang and (value is None or (isinstance(value, list | tuple) and not value)):
            return ()
        if value is None or (isinstance(value, list | tuple) and not value):
            raise SpecError("no command given: put it after --, e.g. vmjob run -- ./simulate")
        if not isinstance(value, list | tuple) or not all(isinstance(a, str) for a in value):
            raise self.fail("argv", "must be a list of strings")
        for arg in value:
            if "\0" in arg:
                raise SpecError(f"argument {arg!r} of the command contains a NUL byte")
        return tuple(value)

    def job_name(self) -> str | None:
        """`name`: printable text (no control characters, so no NUL and no newline that
        would break a table or a log line), 1 to MAX_NAME_CHARS characters."""
        value = self.text("name")
        if value is None:
            return None
        if len(value) > MAX_NAME_CHARS:
            raise self.fail("name", f"is {len(value)} characters long; at most "
                                    f"{MAX_NAME_CHARS}")
        if not value.isprintable():
            raise self.fail("name", f"{value[:40]!r} has a control character; use printable "
                                    "text")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.data.get(key)
        if value is None:
            return default
        if key not in self.typed and isinstance(value, str) \
                and re.fullmatch(r"[+-]?\d{1,12}", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}, not {value!r}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return self._no_nul(key, value)

    def choice(self, key: str, allowed: list[str], default: str | None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}, not {value!r}")
        return str(value)

    def duration(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                seconds = parse_duration(self._no_nul(key, value), self.name(key))
            except VmjobsError as exc:
                raise SpecError(str(exc)) from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds) or seconds <= 0:
                raise self.fail(key, f"must be a positive number of seconds, not {value!r}")
        else:
            raise self.fail(key, "must be a duration (90s, 5m, 2h, 1:30:00) or seconds, "
                                 f"not {value!r}")
        if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
            raise self.fail(key, f"{value!r} is longer than the longest supported "
                                 f"({MAX_DURATION_S // 86400}d)")
        return seconds

    def array(self) -> JobArray | None:
        value = self.data.get("array")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail("array", f"must be text like 1-100, 1,3,5-7 or 0-99%10, not "
                                     f"{value!r}")
        try:
            return parse_array(self._no_nul("array", value))
        except ArrayError as exc:
            raise self.fail("array", str(exc)) from None

    def nodes(self) -> tuple[Mapping[str, Any], ...] | None:
        """`nodes`: a number of members (`--nodes N`) or a list of members' overrides."""
        value = self.data.get("nodes")
        if value is None:
            return None
        if isinstance(value, list | tuple):
            if not 1 <= len(value) <= MAX_NODES:
                raise self.fail("nodes", f"must list 1 to {MAX_NODES} members, not "
                                         f"{len(value)}")
            out = []
            for i, member in enumerate(value):
                where = f"{self.source + ': ' if self.source else ''}nodes[{i}]"
                if not isinstance(member, Mapping):
                    raise SpecError(f"{where} must be a map of {', '.join(MEMBER_FIELDS)}, "
                                    f"not {member!r}")
                unknown = sorted(set(map(str, member)) - set(MEMBER_FIELDS))
                if unknown:
                    raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)} (a member "
                                    f"may set {', '.join(MEMBER_FIELDS)})")
                cmd = member.get("cmd")
                if "cmd" in member and (not isinstance(cmd, list) or not cmd
                                        or not all(isinstance(a, str) for a in cmd)):
                    raise SpecError(f"{where}: cmd must be a non-empty list of strings, "
                                    f"e.g. [sh, -c, 'echo $VMJOB_NODE']")
                out.append(dict(member))
            return tuple(out)
        count = self.integer("nodes", 0, 1, MAX_NODES)
        return tuple({} for _ in range(count))

    def memory(self) -> int:
        key = "mem"
        value = self.data.get(key)
        if value is None:
            return DEFAULT_MEMORY_MIB
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.fail(key, f"must be a size (512M, 1.5G) or a number of bytes, "
                                 f"not {value!r}")
        text = self._no_nul(key, str(value)).strip()
        try:
            mib = parse_size_mib(text, self.name(key))
        except VmjobsError as exc:
            raise SpecError(str(exc)) from None
        if mib > MAX_MEMORY_MIB:
            raise self.fail(key, f"{value!r} is larger than any host")
        bytes_only = text.isdigit()
        if mib < MIN_MEMORY_MIB or (bytes_only and int(text) < MIN_MEMORY_MIB << 20):
            hint = f"; did you mean {text}M?" if bytes_only else ""
            unit = " bytes" if bytes_only else ""
            raise self.fail(key, f"{text}{unit} is too small to boot a guest (at least "
                                 f"{MIN_MEMORY_MIB}M){hint}")
        return mib

    def pairs(self, key: str, check: Any) -> dict[str, str]:
        """`env`/`labels`: a mapping (typed) or NAME=VALUE texts (command line)."""
        value = self.data.get(key)
        if value is None:
            return {}
        pairs: dict[str, str] = {}
        if key in self.typed:
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise self.fail(key, "must map names to strings")
            items = list(value.items())
        else:
            items = []
            for pair in value:
                name, sep, text = str(pair).partition("=")
                if not sep or not name:
                    raise SpecError(f"invalid {self.name(key)} {pair!r}: use NAME=VALUE")
                items.append((name, text))
        for name, text in items:
            problem = check(self._no_nul(key, name))
            if problem:
                raise SpecError(problem)
            pairs[name] = self._no_nul(key, text)
        return pairs
