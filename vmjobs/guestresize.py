"""A job asking to be resized from inside its guest (`vmjob-ctl resize`), when the admin
allows it (the config's `resize_from_guest: on`).

Such a job (a resizable one of no gang) gets the control port `org.vmjobs.ctl.0` and
`/vmjob/bin/vmjob-ctl`, as gang members do; its port is served here, not by the gangs'
`ControlHub`. One request:

    guest:  ID resize CPUS MEM_MIB      (each a whole number, or "-": keep it as it is)
    host:   ID ok DETAIL                (as `vmjob resize`: the new size, then "the guest
                                         sees N cpus, MemTotal M MiB")
          | ID err TEXT

The guest is untrusted: a line is at most MAX_LINE bytes (longer ones are cut and refused),
requests are rate-limited per job (the gangs' token bucket), only one resize runs at a time
per job (a second is refused while it runs) and a job resized asks again only MIN_INTERVAL_S
later (a guest cannot keep its job busy moving), numbers are bounded before they reach
`resize`, and the answer to a request id is remembered so that vmjob-ctl's resends get it
again, never a second resize. The resize itself is the daemon's own path (`moves.resize`,
the job's owner's rights: the guest can only ever resize its own job) and runs off the
port's reader thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vmjobs.control import MAX_LINE, TokenBucket
from vmjobs.errors import VmjobsError

log = logging.getLogger("vmjobs.control")

MAX_CPUS = 4096
MAX_MEMORY_MIB = 1 << 24  # 16 TiB
MAX_ANSWER = 300  # characters of an answer's text
REMEMBERED = 8  # answers kept per job for resent requests
# a job that was resized waits this long before it may ask again: a guest asking in a loop
# would otherwise keep its job "moving" and out of reach of migrations, drains and checkpoints
MIN_INTERVAL_S = 5.0
_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")
_NUMBER = re.compile(r"^[0-9]{1,9}$")


@dataclass(frozen=True)
class ResizeAsk:
    """A parsed request: the job's new cpus and memory (None: keep)."""

    req_id: str
    cpus: int | None
    memory_mib: int | None


def parse(raw: bytes) -> ResizeAsk | str:
    """One request line (without its newline) -> a ResizeAsk, or the answer line refusing
    it."""
    text = raw.decode("ascii", errors="replace")
    words = text.split(" ")
    req_id = words[0] if _ID.match(words[0]) else "-"
    if len(raw) > MAX_LINE:
        return f"{req_id} err request longer than {MAX_LINE} bytes"
    if req_id == "-":
        return "- err malformed request"
    if len(words) < 2 or words[1] != "resize":
        return f"{req_id} err only resize is served on this job's port (it is no gang member)"
    if len(words) != 4 or not all(w == "-" or _NUMBER.match(w) for w in words[2:]):
        return f"{req_id} err usage: resize CPUS|- MEM_MIB|-"
    cpus = None if words[2] == "-" else int(words[2])
    memory = None if words[3] == "-" else int(words[3])
    if cpus is None and memory is None:
        return f"{req_id} err give cpus and/or memory"
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        return f"{req_id} err cpus must be 1 to {MAX_CPUS}"
    if memory is not None and not 1 <= memory <= MAX_MEMORY_MIB:
        return f"{req_id} err memory must be 1 to {MAX_MEMORY_MIB} MiB"
    return ResizeAsk(req_id, cpus, memory)


@dataclass
class _Job:
    bucket: TokenBucket
    running: str | None = None  # the request id being carried out
    resized_at: float | None = None  # when its last resize asked from the guest succeeded
    answered: dict[str, str] = field(default_factory=dict)


class GuestResizes:
    """The requests of the jobs allowed to resize themselves. `request(job_id, raw, reply)`
    is called with each line a job's guest sends (from its port's reader thread); `reply`
    writes one line back. `resize(job_id, cpus, memory_mib) -> detail` does the resize
    (raising VmjobsError); it runs on a thread of its own (`spawn`)."""

    def __init__(self, resize: Callable[[str, int | None, int | None], str],
                 spawn: Callable[[Callable[[], None]], None],
                 clock: Callable[[], float]) -> None:
        self.resize = resize
        self.spawn = spawn
        self.clock = clock
        self.lock = threading.Lock()
        self.jobs: dict[str, _Job] = {}

    def forget(self, job_id: str) -> None:
        with self.lock:
            self.jobs.pop(job_id, None)

    def request(self, job_id: str, raw: bytes, reply: Callable[[str], None]) -> None:
        asked = parse(raw)
        with self.lock:
            job = self.jobs.setdefault(job_id, _Job(TokenBucket(self.clock())))
            if not job.bucket.take(self.clock()):
                rid = asked.split(" ")[0] if isinstance(asked, str) else asked.req_id
                answer: str | None = f"{rid} err too many requests"
            elif isinstance(asked, str):
                answer = asked
            elif asked.req_id in job.answered:
                answer = job.answered[asked.req_id]  # resent: the same answer, no new resize
            elif job.running == asked.req_id:
                answer = None  # resent while it runs: its answer comes when it is done
            elif job.running is not None:
                answer = f"{asked.req_id} err a resize of this job is under way"
            elif job.resized_at is not None and self.clock() - job.resized_at < MIN_INTERVAL_S:
                answer = (f"{asked.req_id} err resized less than {MIN_INTERVAL_S:g} s ago; "
                          "ask again later")
            else:
                job.running = asked.req_id
                answer = None
                self.spawn(lambda: self._carry_out(job_id, job, asked, reply))
        if answer is not None:
            reply(answer)

    def _carry_out(self, job_id: str, job: _Job, asked: ResizeAsk,
                   reply: Callable[[str], None]) -> None:
        resized = False
        try:
            detail = self.resize(job_id, asked.cpus, asked.memory_mib)
            answer = f"{asked.req_id} ok {_clean(detail)}"
            resized = True
        except VmjobsError as exc:
            answer = f"{asked.req_id} err {_clean(str(exc))}"
        except Exception as exc:  # noqa: BLE001 - the guest gets an answer whatever happened
            log.exception("job %s: a resize asked from its guest failed", job_id)
            answer = f"{asked.req_id} err internal error: {_clean(str(exc))}"
        with self.lock:
            job.running = None
            if resized:
                job.resized_at = self.clock()
            job.answered[asked.req_id] = answer
            while len(job.answered) > REMEMBERED:
                del job.answered[next(iter(job.answered))]
        reply(answer)


def _clean(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return "".join(c if " " <= c <= "~" else "?" for c in line)[:MAX_ANSWER]
