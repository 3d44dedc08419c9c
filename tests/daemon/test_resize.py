"""`vmjob resize` on a real guest (TCG) under the daemon: vCPU hotplug and virtio-mem memory,
checked inside the guest (the job prints nproc and MemTotal every second), the store's
reservation and libvirt's pinning following; bad resizes refused with one line and nothing
changed. Run under the guest lock with VMJOBS_TEST_SPOOL of your own."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests.daemon.conftest import URI

# prints "i=I nproc=N mem=KIB" every second, LINES times, then ends. It asks to be resized
# from inside twice (`vmjob-ctl resize`, printing "ctlN rc=RC ANSWER"): at once, beyond its
# maximum (refused), and, once it has 1 cpu and more memory than it started with (the test's
# signal), for 2 cpus (again while the host says the job is moving: the resize that gave it
# that memory may still be finishing)
LINES = 150
MEMTOTAL = "$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo)"
WATCH = (f"m0={MEMTOTAL}; out=$(vmjob-ctl resize --cpus 3 2>&1); echo \"ctl1 rc=$? $out\"; "
         # (a grow plugs memory before cpus: it waits until it has had 2 cpus and has 1 again)
         f"had2=; asked=; i=0; while [ $i -lt {LINES} ]; do m={MEMTOTAL}; "
         "[ $(nproc) = 2 ] && had2=1; "
         "if [ -n \"$had2\" ] && [ -z \"$asked\" ] && [ $(nproc) = 1 ] && [ $m -gt $m0 ]; "
         "then asked=1; "
         # the host's memory resize may still be finishing: ask again while it is
         "n=0; while :; do out=$(vmjob-ctl resize --cpus 2 2>&1); rc=$?; "
         "case \"$out\" in *'is moving'*) [ $n -lt 60 ] || break; n=$((n+1)); sleep 1;; "
         "*) break;; esac; done; echo \"ctl2 rc=$rc $out\"; fi; "
         "echo \"i=$i nproc=$(nproc) mem=$m\"; i=$((i+1)); sleep 1; done")


def _seen(daemon: Any, job: str) -> list[tuple[int, int]]:
    out = daemon.vmjob("logs", job).stdout
    return [(int(a), int(b)) for a, b in re.findall(r"^i=\d+ nproc=(\d+) mem=(\d+)$", out,
                                                    re.MULTILINE)]


def _wait_seen(daemon: Any, job: str, check: Any, timeout: float = 90) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = _seen(daemon, job)
        if seen and check(seen[-1]):
            return seen[-1]
        assert time.monotonic() < deadline, f"guest never showed it: {seen[-5:]}\n" \
            + daemon.log_text()
        time.sleep(0.5)


def _ctl(daemon: Any, job: str, name: str, timeout: float = 90) -> str:
    """The line the job printed after its vmjob-ctl call `name` ("ctl1", "ctl2")."""
    deadline = time.monotonic() + timeout
    while True:
        said = re.search(rf"^{name} (rc=.*)$", daemon.vmjob("logs", job).stdout, re.MULTILINE)
        if said:
            return said.group(1)
        assert time.monotonic() < deadline, f"no {name} line\n" + daemon.log_text()
        time.sleep(0.5)


def _held(daemon: Any, job: str) -> tuple[set[int], int]:
    cpus = {r["cpu"] for r in daemon.query("SELECT cpu FROM cpu_reservations WHERE job_id = ?",
                                            job)}
    (row,) = daemon.query("SELECT allocation FROM jobs WHERE id = ?", job)
    return cpus, json.loads(row["allocation"])["memory_mib"]


def _pins(job: str) -> list[set[int]]:
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(f"vmjob-{job}")
        return [{i for i, on in enumerate(row) if on}
                for row in dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)]
    finally:
        conn.close()


@pytest.mark.guest
def test_resize_grows_and_shrinks_cpus_and_memory_seen_in_the_guest(make_daemon: Any) -> None:
    daemon = make_daemon("resize", hotplug=True, hotplug_max_mem="256M",
                         resize_from_guest=True)
    daemon.start()
    job = daemon.vmjob("submit", "--cpus", "1", "--mem", "256M", "--", "sh", "-c",
                       WATCH).stdout.strip()
    # asked from inside, beyond its maximum: refused with resize's own words
    assert _ctl(daemon, job, "ctl1") == \
        f"rc=1 vmjob-ctl: job {job}: its guest can have 1 to 2 vCPUs, not 3"
    nproc, mem0 = _wait_seen(daemon, job, lambda s: True)
    assert nproc == 1
    cpus, memory = _held(daemon, job)
    assert len(cpus) == 1 and memory == 256
    (first,) = cpus

    # bad resizes: one line, nothing changed
    for args, message in ((("--cpus", "3"), "its guest can have 1 to 2 vCPUs, not 3"),
                          (("--mem", "600M"), "its guest's memory can be 256 MiB to 512 MiB"),
                          (("--mem", "257M"), "in steps of 2 MiB")):
        proc = daemon.vmjob("resize", job, *args)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert _held(daemon, job) == ({first}, 256)
    assert daemon.vmjob("resize", job).returncode == 2

    # grow: reserved, plugged, pinned, seen by the guest
    grown = daemon.vmjob("resize", job, "--cpus", "2", "--mem", "512M", "--json",
                         timeout=180)
    assert grown.returncode == 0, grown.stderr + daemon.log_text()
    (result,) = json.loads(grown.stdout)
    assert result["action"] == "resized" and "the guest sees 2 cpus" in result["detail"]
    cpus, memory = _held(daemon, job)
    assert first in cpus and len(cpus) == 2 and memory == 512
    other = (cpus - {first}).pop()
    assert _pins(job) == [{first}, {other}]
    nproc, mem1 = _wait_seen(daemon, job, lambda s: s[0] == 2 and s[1] > mem0)
    assert mem1 - mem0 == 256 * 1024  # KiB: exactly the 256 MiB plugged

    # shrink memory: the guest's virtio-mem driver unplugs it; then it goes back to the pool
    shrunk = daemon.vmjob("resize", job, "--mem", "256M", "--json", timeout=180)
    assert shrunk.returncode == 0, shrunk.stderr + daemon.log_text()
    assert _held(daemon, job) == (cpus, 256)
    _wait_seen(daemon, job, lambda s: s == (2, mem0))

    # shrink cpus: under TCG QEMU cannot unplug a vCPU (virt/hotplug.py says why), so the
    # guest offlines it and its halted thread is confined to the core the job keeps; only
    # then the other core goes back to the pool
    fewer = daemon.vmjob("resize", job, "--cpus", "1", "--json", timeout=180)
    assert fewer.returncode == 0, fewer.stderr + daemon.log_text()
    (result,) = json.loads(fewer.stdout)
    assert "vCPUs offlined by the guest and confined" in result["detail"], result
    assert "the guest sees 1 cpus" in result["detail"], result
    assert _held(daemon, job) == ({first}, 256)
    assert _pins(job) == [{first}, {first}]  # vCPU 1 can only run on the job's own core
    _wait_seen(daemon, job, lambda s: s == (1, mem0))
    # the freed core takes another job at once, while the first runs on
    second = daemon.vmjob("submit", "--cpus", "1", "--mem", "256M", "--", "echo",
                          "second").stdout.strip()
    ended = daemon.wait_all_ended([second], timeout=180)
    assert ended[second]["state"] == "COMPLETED", ended
    (row,) = daemon.query("SELECT allocation FROM jobs WHERE id = ?", second)
    assert json.loads(row["allocation"])["cpus"] == [other]
    assert "second" in daemon.vmjob("logs", second).stdout

    # grow again, asked from inside (the job asks once it sees more memory): the vCPU left
    # plugged is used again, pinned to its core and onlined
    assert daemon.vmjob("resize", job, "--mem", "258M").returncode == 0
    said = _ctl(daemon, job, "ctl2", timeout=180)
    assert said.startswith("rc=0 ") and "(vCPUs onlined again)" in said \
        and "the guest sees 2 cpus" in said, said + daemon.log_text()
    assert _held(daemon, job) == ({first, other}, 258)
    assert _pins(job) == [{first}, {other}]
    _wait_seen(daemon, job, lambda s: s == (2, mem0 + 2048))

    events = [e["reason"] or "" for e in daemon.client().job(job)["events"]]
    assert sum("resized to" in e for e in events) == 5, events
    # the job ran on through all of it, and its whole output is there
    ended = daemon.wait_all_ended([job], timeout=LINES + 120)
    assert ended[job]["state"] == "COMPLETED", ended
    counted = re.findall(r"^i=(\d+) ", daemon.vmjob("logs", job).stdout, re.MULTILINE)
    assert counted == [str(i) for i in range(LINES)]


@pytest.fixture
def make_daemon(make_daemon: Any) -> Iterator[Any]:
    """The shared factory, each daemon's jobs cancelled at the end whatever happened."""
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        made.append(make_daemon(*args, **kwargs))
        return made[-1]

    yield make
    for daemon in made:
        for row in daemon.query("SELECT id FROM jobs WHERE state = 'RUNNING'"):
            daemon.vmjob("cancel", row["id"])
