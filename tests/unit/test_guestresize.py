"""`vmjob-ctl resize` on the host's side (vmjobs/guestresize.py), without a guest: what a
request line may say, the bounds, one resize at a time per job, resends answered once, and
the config switch."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmjobs.config import parse as parse_config
from vmjobs.control import MAX_LINE, RATE_BURST
from vmjobs.errors import ConfigError, VmjobsError
from vmjobs.guestresize import GuestResizes, ResizeAsk, parse


@pytest.mark.parametrize(("line", "parsed"), [
    (b"c1 resize 2 -", ResizeAsk("c1", 2, None)),
    (b"c1 resize - 512", ResizeAsk("c1", None, 512)),
    (b"A9 resize 1 256", ResizeAsk("A9", 1, 256)),
])
def test_a_request_names_cpus_and_or_memory(line: bytes, parsed: ResizeAsk) -> None:
    assert parse(line) == parsed


@pytest.mark.parametrize(("line", "answer"), [
    (b"c1 resize - -", "c1 err give cpus and/or memory"),
    (b"c1 resize 0 -", "c1 err cpus must be 1 to 4096"),
    (b"c1 resize 99999 -", "c1 err cpus must be 1 to 4096"),
    (b"c1 resize - 999999999", "c1 err memory must be 1 to 16777216 MiB"),
    (b"c1 resize -2 -", "c1 err usage: resize CPUS|- MEM_MIB|-"),
    (b"c1 resize 2", "c1 err usage: resize CPUS|- MEM_MIB|-"),
    (b"c1 resize 2 1G", "c1 err usage: resize CPUS|- MEM_MIB|-"),
    (b"c1 resize 0x2 -", "c1 err usage: resize CPUS|- MEM_MIB|-"),
    (b"c1 barrier x 0", "c1 err only resize is served on this job's port (it is no gang "
                        "member)"),
    (b"$(reboot) resize 2 -", "- err malformed request"),
    (b"c1 resize 2 " + b"9" * MAX_LINE, f"c1 err request longer than {MAX_LINE} bytes"),
])
def test_a_bad_request_is_refused_with_one_line(line: bytes, answer: str) -> None:
    assert parse(line) == answer


class Harness:
    """A GuestResizes whose resizes are recorded and carried out when the test says."""

    def __init__(self, result: Callable[[int | None, int | None], str]) -> None:
        self.now = 0.0
        self.asked: list[tuple[str, int | None, int | None]] = []
        self.queued: list[Callable[[], None]] = []
        self.replies: list[str] = []

        def resize(job_id: str, cpus: int | None, memory: int | None) -> str:
            self.asked.append((job_id, cpus, memory))
            return result(cpus, memory)

        self.service = GuestResizes(resize, self.queued.append, lambda: self.now)

    def send(self, line: bytes, job: str = "j1") -> None:
        self.service.request(job, line, self.replies.append)

    def run(self) -> None:
        while self.queued:
            self.queued.pop(0)()


def test_one_resize_at_a_time_and_a_resend_gets_the_same_answer() -> None:
    h = Harness(lambda cpus, _mem: f"cpus 0,1 (node0), 256 MiB; the guest sees {cpus} cpus")
    h.send(b"c1 resize 2 -")
    h.send(b"c1 resize 2 -")  # vmjob-ctl resends until it hears: still under way, no answer
    h.send(b"c2 resize 1 -")  # another call meanwhile
    assert h.replies == ["c2 err a resize of this job is under way"]
    h.send(b"c3 resize 2 -", job="j2")  # another job's are its own
    h.run()
    assert h.asked == [("j1", 2, None), ("j2", 2, None)]
    assert h.replies[1:] == ["c1 ok cpus 0,1 (node0), 256 MiB; the guest sees 2 cpus",
                             "c3 ok cpus 0,1 (node0), 256 MiB; the guest sees 2 cpus"]
    h.send(b"c1 resize 2 -")  # resent after the answer: answered again, not resized again
    h.run()
    assert len(h.asked) == 2 and h.replies[-1].startswith("c1 ok ")
    # a job just resized waits before it may ask again; a refused request costs no wait
    h.send(b"c4 resize 1 -")
    assert h.replies[-1] == "c4 err resized less than 5 s ago; ask again later"
    h.now += 5.0
    h.send(b"c4 resize 1 -")
    h.run()
    assert h.asked[-1] == ("j1", 1, None) and h.replies[-1].startswith("c4 ok ")


def test_a_refused_resize_does_not_make_the_job_wait() -> None:
    def refuse(_cpus: int | None, _mem: int | None) -> str:
        raise VmjobsError("job j1 is moving; only a RUNNING job can move")

    h = Harness(refuse)
    h.send(b"c1 resize 2 -")
    h.run()
    h.send(b"c2 resize 2 -")
    h.run()
    assert len(h.asked) == 2
    assert h.replies == ["c1 err job j1 is moving; only a RUNNING job can move",
                         "c2 err job j1 is moving; only a RUNNING job can move"]


def test_a_refused_resize_is_an_err_line_of_printable_text() -> None:
    def refuse(_cpus: int | None, _mem: int | None) -> str:
        raise VmjobsError("job j1 cannot grow to 4 cpus:\x1b[2J no room\nsecond line")

    h = Harness(refuse)
    h.send(b"c1 resize 4 -")
    h.run()
    assert h.replies == ["c1 err job j1 cannot grow to 4 cpus:?[2J no room"]


def test_requests_are_rate_limited_per_job() -> None:
    h = Harness(lambda _c, _m: "")
    for _ in range(int(RATE_BURST)):
        h.send(b"x resize")  # malformed ones count too
    h.send(b"c9 resize 2 -")
    assert h.replies[-1] == "c9 err too many requests"
    assert not h.queued
    h.now += 1.0  # the bucket fills again
    h.send(b"c9 resize 2 -")
    assert len(h.queued) == 1


def test_resize_from_guest_is_off_unless_the_config_says_on() -> None:
    base = {"hosts": [{"name": "a", "uri": "test:///default"}]}
    assert parse_config(base, "c.yaml").resize_from_guest is False
    assert parse_config({**base, "resize_from_guest": True}, "c.yaml").resize_from_guest
    with pytest.raises(ConfigError, match="resize_from_guest"):
        parse_config({**base, "resize_from_guest": "yes"}, "c.yaml")
