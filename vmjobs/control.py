"""The control state of one gang: its key-value store, barriers, batons and poison.

Pure and single-threaded: `GangControl.request` takes one line a member's guest sent
(`vmjob-ctl`, images/vmjob-ctl.c) and returns the replies it causes — to that member and,
when a wait completes, to others. `fail` poisons the gang on a member's failure, `expire`
ends waits whose deadline passed. The daemon's `ControlHub` (vmjobs/controlhub.py) holds one
per gang behind a lock, feeds it the lines from the members' virtio-serial ports and sends the
replies back. A member can only ever reach the gang whose port it is attached to: the hub
keys the state by the port, never by anything the guest says.

Protocol (docs/guest-protocol.md, "The control port"), one line each, at most MAX_LINE bytes:

    guest:  ID barrier NAME TIMEOUT_MS        (0: no timeout)
            ID baton take NAME | ID baton pass NAME
            ID kv set KEY VALUE               (VALUE: the rest of the line)
            ID kv get KEY WAIT                (WAIT: 0 | 1)
            ID nodes
            ID poison REASON
            ID ended STATUS                   (the init: the job exited with STATUS, 0-255)
    host:   ID ok [TEXT] | ID err TEXT | ID data TEXT (lines of `nodes`, before its ok)

ID is the guest's request id (1-16 letters or digits); the host answers every request it
accepts with exactly one `ok` or `err`. A line that cannot be parsed is answered with `err`
(id `-` when even the id is unreadable).

States (explicit, `GangState`): OPEN -> POISONED. A poisoned gang answers every pending and
later barrier and baton request, and every pending `kv get --wait`, with an error naming who
poisoned it; `kv` and `nodes` still work (for diagnosis). A barrier NAME is a `Barrier` in
WAITING until all N members arrived (RELEASED: all get `ok`, the next arrival starts its next
round) — or until a waiter's deadline passes (that waiter gets `err`, the others keep
waiting).

What must outlive the daemon (`durable`, `restore`): the kv store, who holds each baton, each
barrier's round, the poison and the answers remembered for requests sent again — as rows
`(kind, name) -> value` the daemon keeps in its store (vmjobs/controljournal.py). Open waits
are not kept: a waiting `vmjob-ctl` sends its request again until it is answered, so a
restarted daemon rebuilds them.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

MAX_LINE = 512  # bytes of one request line, newline excluded
MAX_KEY = 64
MAX_VALUE = 256
MAX_KEYS = 1024  # keys per gang
MAX_NAMES = 256  # barrier names and baton names per gang, each
MAX_PENDING = 8  # waits one member may have open at once
MAX_REASON = 200
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000
REMEMBERED = 16  # answers kept per member for requests sent again (vmjob-ctl resends)
RATE_PER_S = 50.0  # requests per second per member, sustained
RATE_BURST = 100.0  # and in a burst
_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_ANSWER = re.compile(r"^([0-9]+):([A-Za-z0-9]{1,16})$")

Rows = dict[tuple[str, str], str]  # (kind, name) -> value: a gang's durable control state


class GangState(StrEnum):
    OPEN = "open"
    POISONED = "poisoned"


class BarrierState(StrEnum):
    WAITING = "waiting"  # some members arrived, not all
    RELEASED = "released"  # all arrived and were let go; the next arrival opens a new round


@dataclass(frozen=True)
class Reply:
    """A line for member `index` (without the newline)."""

    index: int
    line: str


@dataclass(frozen=True)
class Wait:
    """A request answered later."""

    index: int
    req_id: str
    deadline: float | None = None


@dataclass
class Barrier:
    state: BarrierState = BarrierState.RELEASED
    round: int = 0
    arrived: dict[int, Wait] = field(default_factory=dict)


@dataclass
class Baton:
    holder: int | None = None
    queue: deque[Wait] = field(default_factory=deque)


@dataclass
class MemberInfo:
    """What `nodes` tells about a member (the hub keeps it current)."""

    host: str
    address: str = "-"
    state: str = "running"


class LineSplitter:
    """Bytes from a port -> lines without their newline, in bounded memory: a line longer
    than `max_line` comes out cut at `max_line + 1` bytes (the service answers it with an
    error) and the rest of it, up to its newline, is dropped."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.buffer = bytearray()
        self.dropping = False

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            part = chunk[start:] if end < 0 else chunk[start:end]
            if not self.dropping:
                self.buffer += part[: self.max_line + 1 - len(self.buffer)]
                if len(self.buffer) > self.max_line:
                    lines.append(bytes(self.buffer))
                    self.buffer.clear()
                    self.dropping = True
            if end < 0:
                return lines
            if not self.dropping:
                lines.append(bytes(self.buffer))
            self.buffer.clear()
            self.dropping = False
            start = end + 1


class TokenBucket:
    """RATE_PER_S sustained, RATE_BURST at once (the classic token bucket)."""

    def __init__(self, now: float) -> None:
        self.tokens = RATE_BURST
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(RATE_BURST, self.tokens + (now - self.at) * RATE_PER_S)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class GangControl:
    """One gang's coordination state (see the module doc). Not thread-safe: its owner locks."""

    def __init__(self, gang_id: str, members: dict[int, MemberInfo],
                 clock: Callable[[], float]) -> None:
        self.gang_id = gang_id
        self.members = members
        self.clock = clock
        self.state = GangState.OPEN
        self.poison_reason: str | None = None
        self.kv: dict[str, str] = {}
        self.kv_waits: dict[str, list[Wait]] = {}
        self.barriers: dict[str, Barrier] = {}
        self.batons: dict[str, Baton] = {}
        self.buckets: dict[int, TokenBucket] = {}
        # the last REMEMBERED final answers per member, by request id: a request the guest
        # sent again (it heard nothing yet) gets the same answer, never a second effect
        self.answered: dict[int, dict[str, list[str]]] = {}
        # member -> the non-zero exit status its guest's init reported (`ended`) before the
        # guest powered off: the daemon records that member's end seconds later
        self.exit_reported: dict[int, int] = {}

    # --- what outlives the daemon ---------------------------------------------------------

    def durable(self) -> Rows:
        """The state a restarted daemon needs, as rows: ("kv", KEY) -> VALUE, ("baton", NAME)
        -> holder index, ("round", NAME) -> barrier round, ("poison", "") -> reason,
        ("answer", "INDEX:ID") -> the answer's lines joined by newlines (they hold none)."""
        rows: Rows = {("kv", k): v for k, v in self.kv.items()}
        rows.update({("baton", name): str(b.holder) for name, b in self.batons.items()
                     if b.holder is not None})
        rows.update({("round", name): str(b.round) for name, b in self.barriers.items()
                     if b.round})
        if self.state == GangState.POISONED and self.poison_reason is not None:
            rows[("poison", "")] = self.poison_reason
        for index, kept in self.answered.items():
            rows.update({("answer", f"{index}:{req_id}"): "\n".join(lines)
                         for req_id, lines in kept.items()})
        return rows

    def restore(self, rows: Rows) -> None:
        """Take up the state `durable` gave (a fresh gang's, rows in the order they were
        written). Rows that do not fit this gang (unknown kind, member, bad name) are skipped:
        the store is ours, but a row must never make a gang reach another's members."""
        for (kind, name), value in rows.items():
            if kind == "kv" and _check_kv(name, value, False) is None:
                self.kv[name] = value
            elif kind == "baton" and _NAME.match(name) and value.isdigit() \
                    and int(value) in self.members:
                self.batons.setdefault(name, Baton()).holder = int(value)
            elif kind == "round" and _NAME.match(name) and value.isdigit():
                self.barriers.setdefault(name, Barrier()).round = int(value)
            elif kind == "poison":
                self.state, self.poison_reason = GangState.POISONED, _clean(value, 2 * MAX_REASON)
            elif kind == "answer" and (match := _ANSWER.match(name)) \
                    and int(match.group(1)) in self.members:
                kept = self.answered.setdefault(int(match.group(1)), {})
                kept[match.group(2)] = value.split("\n")
                while len(kept) > REMEMBERED:
                    del kept[next(iter(kept))]

    # --- the host's side -------------------------------------------------------------------

    def fail(self, index: int | None, reason: str) -> list[Reply]:
        return self._track(self._fail(index, reason))

    def _fail(self, index: int | None, reason: str) -> list[Reply]:
        """Poison the gang: member `index` failed (None: the host poisoned it). Every pending
        barrier, baton and kv wait is answered with an error naming the member. A gang that
        is already poisoned keeps its first reason."""
        if self.state == GangState.POISONED:
            return []
        who = self._name(index) if index is not None else "the host"
        self.state = GangState.POISONED
        self.poison_reason = f"poisoned by {who}: {_clean(reason, MAX_REASON)}"
        replies = []
        for barrier in self.barriers.values():
            replies += [self._err(w, self.poison_reason) for w in barrier.arrived.values()]
            barrier.arrived.clear()
            barrier.state = BarrierState.RELEASED
        for baton in self.batons.values():
            replies += [self._err(w, self.poison_reason) for w in baton.queue]
            baton.queue.clear()
        for waits in self.kv_waits.values():
            replies += [self._err(w, self.poison_reason) for w in waits]
        self.kv_waits.clear()
        return replies

    def set_key(self, key: str, value: str) -> list[Reply]:
        """`vmjob kv JOB set`: as a member's `kv set`. Raises ValueError on a bad key/value."""
        problem = _check_kv(key, value, len(self.kv) >= MAX_KEYS and key not in self.kv)
        if problem:
            raise ValueError(problem)
        return self._track(self._store(key, value))

    def get_key(self, key: str) -> str | None:
        return self.kv.get(key)

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for b in self.barriers.values() for w in b.arrived.values()
                     if w.deadline is not None]
        return min(deadlines, default=None)

    def expire(self, now: float) -> list[Reply]:
        """Answer the barrier waits whose deadline passed with `err`."""
        return self._track(self._expire(now))

    def _expire(self, now: float) -> list[Reply]:
        replies = []
        for name, barrier in self.barriers.items():
            for index, wait in list(barrier.arrived.items()):
                if wait.deadline is not None and wait.deadline <= now:
                    del barrier.arrived[index]
                    missing = sorted(set(self.members) - set(barrier.arrived) - {index})
                    replies.append(self._err(wait, f"barrier {name}: timed out waiting for "
                                             + ", ".join(self._name(i) for i in missing)))
            if not barrier.arrived:
                barrier.state = BarrierState.RELEASED
        return replies

    # --- the guests' side ---------------------------------------------------------------------

    def request(self, index: int, raw: bytes) -> list[Reply]:
        """One line (without its newline) from member `index`'s guest."""
        if index not in self.members:
            return []
        now = self.clock()
        bucket = self.buckets.setdefault(index, TokenBucket(now))
        text = raw.decode("ascii", errors="replace")
        words = text.split(" ")
        req_id = words[0] if _ID.match(words[0]) else "-"
        if not bucket.take(now):
            return [Reply(index, f"{req_id} err too many requests (at most "
                                 f"{RATE_PER_S:g}/s)")]
        if len(raw) > MAX_LINE:
            return [Reply(index, f"{req_id} err request longer than {MAX_LINE} bytes")]
        if req_id == "-" or not _PRINTABLE.match(text):
            return [Reply(index, f"{req_id} err malformed request")]
        again = self.answered.get(index, {}).get(req_id)
        if again is not None:
            return [Reply(index, line) for line in again]
        if req_id in self._pending_ids(index):
            return []  # sent again while it waits: it is still waiting
        verb, args = (words[1], words[2:]) if len(words) > 1 else ("", [])
        handler = {"barrier": self._barrier, "baton": self._baton, "kv": self._kv,
                   "nodes": self._nodes, "poison": self._poison,
                   "ended": self._ended}.get(verb)
        if handler is None:
            return [Reply(index, f"{req_id} err unknown request {verb[:20]!r}")]
        return self._track(handler(Wait(index, req_id), args))

    def _track(self, replies: list[Reply]) -> list[Reply]:
        """Remember each member's answers (data lines with their final line) by id."""
        lines: dict[tuple[int, str], list[str]] = {}
        for reply in replies:
            req_id, kind = (reply.line.split(" ", 2) + ["", ""])[:2]
            lines.setdefault((reply.index, req_id), []).append(reply.line)
            if kind in ("ok", "err") and req_id != "-":
                kept = self.answered.setdefault(reply.index, {})
                kept[req_id] = lines[(reply.index, req_id)]
                while len(kept) > REMEMBERED:
                    del kept[next(iter(kept))]
        return replies

    def _barrier(self, wait: Wait, args: list[str]) -> list[Reply]:
        if len(args) != 2 or not _NAME.match(args[0]) or not args[1].isdigit() \
                or int(args[1]) > MAX_TIMEOUT_MS:
            return [self._err(wait, "usage: barrier NAME TIMEOUT_MS")]
        if self.state == GangState.POISONED:
            return [self._err(wait, self.poison_reason or "poisoned")]
        name, timeout_ms = args[0], int(args[1])
        if name not in self.barriers and len(self.barriers) >= MAX_NAMES:
            return [self._err(wait, f"at most {MAX_NAMES} barrier names")]
        barrier = self.barriers.setdefault(name, Barrier())
        if wait.index in barrier.arrived:
            return [self._err(wait, f"barrier {name}: already waiting")]
        if self._pending(wait.index) >= MAX_PENDING:
            return [self._err(wait, f"at most {MAX_PENDING} waits at once")]
        deadline = self.clock() + timeout_ms / 1000 if timeout_ms else None
        if barrier.state == BarrierState.RELEASED:
            barrier.state, barrier.round = BarrierState.WAITING, barrier.round + 1
        barrier.arrived[wait.index] = Wait(wait.index, wait.req_id, deadline)
        if set(barrier.arrived) != set(self.members):
            return []
        waits = list(barrier.arrived.values())
        barrier.arrived.clear()
        barrier.state = BarrierState.RELEASED
        return [Reply(w.index, f"{w.req_id} ok {name} round {barrier.round}") for w in waits]

    def _baton(self, wait: Wait, args: list[str]) -> list[Reply]:
        if len(args) != 2 or args[0] not in ("take", "pass") or not _NAME.match(args[1]):
            return [self._err(wait, "usage: baton take|pass NAME")]
        if self.state == GangState.POISONED:
            return [self._err(wait, self.poison_reason or "poisoned")]
        how, name = args
        if name not in self.batons and len(self.batons) >= MAX_NAMES:
            return [self._err(wait, f"at most {MAX_NAMES} baton names")]
        baton = self.batons.setdefault(name, Baton())
        if how == "take":
            if baton.holder == wait.index:
                return [self._err(wait, f"baton {name}: you hold it already")]
            if baton.holder is None:
                baton.holder = wait.index
                return [self._ok(wait, name)]
            if any(w.index == wait.index for w in baton.queue):
                return [self._err(wait, f"baton {name}: already waiting")]
            if self._pending(wait.index) >= MAX_PENDING:
                return [self._err(wait, f"at most {MAX_PENDING} waits at once")]
            baton.queue.append(wait)
            return []
        if baton.holder != wait.index:
            holder = "nobody" if baton.holder is None else self._name(baton.holder)
            return [self._err(wait, f"baton {name}: held by {holder}, not you")]
        replies = [self._ok(wait, name)]
        if baton.queue:
            following = baton.queue.popleft()
            baton.holder = following.index
            replies.append(self._ok(following, name))
        else:
            baton.holder = None
        return replies

    def _kv(self, wait: Wait, args: list[str]) -> list[Reply]:
        if len(args) >= 3 and args[0] == "set":
            key, value = args[1], " ".join(args[2:])
            problem = _check_kv(key, value, len(self.kv) >= MAX_KEYS and key not in self.kv)
            if problem:
                return [self._err(wait, problem)]
            return [self._ok(wait), *self._store(key, value)]
        if len(args) == 3 and args[0] == "get" and args[2] in ("0", "1"):
            key = args[1]
            problem = _check_kv(key, "", False)
            if problem:
                return [self._err(wait, problem)]
            if key in self.kv:
                return [self._ok(wait, self.kv[key])]
            if args[2] == "0":
                return [self._err(wait, f"no key {key}")]
            if self.state == GangState.POISONED:
                return [self._err(wait, self.poison_reason or "poisoned")]
            if self._pending(wait.index) >= MAX_PENDING:
                return [self._err(wait, f"at most {MAX_PENDING} waits at once")]
            self.kv_waits.setdefault(key, []).append(wait)
            return []
        return [self._err(wait, "usage: kv set KEY VALUE | kv get KEY 0|1")]

    def _nodes(self, wait: Wait, args: list[str]) -> list[Reply]:
        if args:
            return [self._err(wait, "usage: nodes")]
        lines = [Reply(wait.index, f"{wait.req_id} data node{i} {m.host} {m.address} {m.state}")
                 for i, m in sorted(self.members.items())]
        return [*lines, self._ok(wait, f"{len(self.members)} nodes")]

    def _poison(self, wait: Wait, args: list[str]) -> list[Reply]:
        if not args:
            return [self._err(wait, "usage: poison REASON")]
        return [self._ok(wait), *self._fail(wait.index, " ".join(args))]

    def _ended(self, wait: Wait, args: list[str]) -> list[Reply]:
        """The guest init's word that the member's job exited with STATUS, sent before it
        writes the output disk and powers off (images/init): a non-zero status poisons the
        gang now, with the reason its recorded end would give (`exit status N`), instead of
        after the guest's power-off and collection. Untrusted like every request: it can do
        no more than `poison`."""
        if len(args) != 1 or not args[0].isdigit() or len(args[0]) > 3 or int(args[0]) > 255:
            return [self._err(wait, "usage: ended STATUS (0-255)")]
        status = int(args[0])
        if status == 0:
            return [self._ok(wait)]
        self.exit_reported.setdefault(wait.index, status)
        self.members[wait.index].state = "failed"
        return [self._ok(wait), *self._fail(wait.index, f"exit status {status}")]

    # --- helpers --------------------------------------------------------------------------

    def _store(self, key: str, value: str) -> list[Reply]:
        self.kv[key] = value
        return [self._ok(w, value) for w in self.kv_waits.pop(key, [])]

    def _waits(self) -> list[Wait]:
        waits = [w for b in self.barriers.values() for w in b.arrived.values()]
        waits += [w for b in self.batons.values() for w in b.queue]
        return waits + [w for ws in self.kv_waits.values() for w in ws]

    def _pending(self, index: int) -> int:
        return sum(w.index == index for w in self._waits())

    def _pending_ids(self, index: int) -> set[str]:
        return {w.req_id for w in self._waits() if w.index == index}

    def _name(self, index: int) -> str:
        member = self.members.get(index)
        return f"node{index} ({member.host})" if member else f"node{index}"

    @staticmethod
    def _ok(wait: Wait, text: str = "") -> Reply:
        return Reply(wait.index, f"{wait.req_id} ok {text}".rstrip())

    @staticmethod
    def _err(wait: Wait, text: str) -> Reply:
        return Reply(wait.index, f"{wait.req_id} err {text}")


def _check_kv(key: str, value: str, full: bool) -> str | None:
    if not _NAME.match(key) or len(key) > MAX_KEY:
        return f"bad key (1-{MAX_KEY} of A-Z a-z 0-9 . _ : -)"
    if len(value.encode()) > MAX_VALUE or not _PRINTABLE.match(value):
        return f"bad value (at most {MAX_VALUE} printable ASCII characters)"
    if full:
        return f"at most {MAX_KEYS} keys per gang"
    return None


def _clean(text: str, limit: int) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]
