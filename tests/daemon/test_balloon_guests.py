"""Guests' balloons with real guests (TCG; run under the guest lock; docs/borrowing.md
"Borrowing memory"), one scenario on the local host's two usable cpus, with node 0 cut down
by `reserved_memory` to MEMORY_MIB for jobs:

- an owner (1 cpu, OWNER_MIB) sits idle; its balloon's statistics reach the daemon: `show`
  and the metrics give its memory used, and when it then fills a tmpfs with n MiB its
  reported use rises by about n (tmpfs pages cannot be reclaimed: MemAvailable falls);
- with `borrow.memory: balloon`, a `--borrow` job (1 cpu, BORROWER_MIB) that does not fit in
  the node's free memory is placed on the free core with the rest of its memory borrowed from
  the owner (a memory loan, no core loan);
- the owner's fill makes its spare fall below what it lends plus half the margin: the
  borrower is given back (checkpointed: nothing else is free), restored once the owner ends,
  and both finish with their whole output.

Figures (rise seen, give-back times) are printed; run with -s.
"""

from __future__ import annotations

import re
import time
from typing import Any

import libvirt

from tests.daemon.conftest import URI, host_entry
from tests.daemon.test_remote import free_port, scrape
from vmjobs.virt.inventory import parse_capabilities

MEMORY_MIB = 1024  # node 0's memory for jobs
OWNER_MIB = 768
BORROWER_MIB = 320  # 256 free: it borrows 64 MiB of the owner's
LENT_MIB = BORROWER_MIB - (MEMORY_MIB - OWNER_MIB)
# lending 64 MiB needs 320 MiB spare over `for`; it ends below 64 + 128 MiB
MARGIN = "256M"
BORROW = {"idle_below": 0.1, "for": "3s", "give_back_within": "4s", "memory": "balloon",
          "memory_margin": MARGIN}
# after 40 s idle the owner fills a tmpfs with all but 120 MiB of its MemAvailable (tmpfs
# pages cannot be reclaimed: MemAvailable falls by what it wrote) and says how much
OWNER = ("echo owner-idle; sleep 40; mkdir -p /fill; mount -t tmpfs -o size=95% tmpfs /fill; "
         "n=$(( $(sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) / 1024 - 120 )); "
         "dd if=/dev/zero of=/fill/x bs=1M count=$n 2>/dev/null; echo owner-filled $n; "
         "sleep 20; rm /fill/x; echo owner-done")
TICKS = 50
BORROWER = (f"i=0; while [ $i -lt {TICKS} ]; do echo tick $i; i=$((i + 1)); sleep 1; done; "
            "echo borrower-done")


def _node0_reserve() -> str:
    """reserved_memory that leaves node 0 MEMORY_MIB for jobs (the reservation is split over
    the nodes that have cpus: this host's inventory as vmjobs reads it)."""
    conn = libvirt.open(URI)
    try:
        nodes = parse_capabilities(conn.getCapabilities())
    finally:
        conn.close()
    with_cpus = [n for n in nodes if n.cpus] or list(nodes)
    node0 = next(n for n in nodes if n.id == 0)
    return f"{(node0.memory_mib - MEMORY_MIB) * len(with_cpus)}M"


def _wait_for(check: Any, what: str, daemon: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not seen after {timeout}s:\n" \
                                            f"{daemon.log_text()}"
        time.sleep(0.2)
    return value


def test_balloon_stats_reach_the_daemon_and_lent_memory_is_given_back(
        make_daemon: Any) -> None:
    port = free_port()
    daemon = make_daemon("balloon-real", hosts=[{**host_entry(),
                                                 "reserved_memory": _node0_reserve()}],
                         usage_sample_interval=1, usage_window="5s", borrow=BORROW,
                         metrics_port=port)
    daemon.start()
    client = daemon.client()
    owner = client.submit({"argv": ["sh", "-c", OWNER], "cpus": 1, "mem": f"{OWNER_MIB}M",
                           "time_limit": "600s"})["id"]
    first = _wait_for(lambda: client.job(owner).get("memory_used_mib"),
                      "the owner's balloon statistics", daemon, 90)
    assert 0 < first < OWNER_MIB
    metrics = scrape(port)
    assert metrics[f'vmjobs_job_memory_held_bytes{{host="local",job="{owner}"}}'] == \
        OWNER_MIB << 20
    assert 0 < metrics[f'vmjobs_job_memory_used_bytes{{host="local",job="{owner}"}}'] < \
        OWNER_MIB << 20

    borrower = client.submit({"argv": ["sh", "-c", BORROWER], "cpus": 1,
                              "mem": f"{BORROWER_MIB}M", "borrow": True,
                              "time_limit": "600s"})["id"]
    readings: list[tuple[Any, Any]] = []  # the owner's (used, resident) meanwhile

    def running() -> Any:
        owner_view = client.job(owner)
        readings.append((owner_view["memory_used_mib"], owner_view["memory_resident_mib"]))
        return (v := client.job(borrower))["state"] == "RUNNING" and v

    try:
        placed = _wait_for(running, "the borrower running", daemon, 90)
    finally:
        print(f"owner's (used, resident) MiB while the borrower waited: {readings[::10]}")
    assert placed["memory_loans"] == [{"host": "local", "node": 0, "mib": LENT_MIB,
                                       "owner": owner, "borrower": borrower}]
    assert placed["loans"] == []  # a free core: only memory is borrowed
    view = client.job(owner)
    idle_used = view["memory_used_mib"]  # settled since boot; the owner is still idle
    print(f"owner idle: used {first} MiB at its first report, {idle_used} MiB when the "
          f"borrower runs; resident {view['memory_resident_mib']} MiB of {OWNER_MIB} MiB")
    assert "owner-idle" in "".join(client.logs(owner))
    assert "owner-filled" not in "".join(client.logs(owner)), \
        "the owner filled its memory before the borrower was placed: lengthen its idle phase"

    filled = _wait_for(lambda: re.findall(r"owner-filled (\d+)", "".join(client.logs(owner))),
                       "the owner's fill", daemon, 120)
    filled_at, fill_mib = time.monotonic(), int(filled[0])
    assert fill_mib > 300, "the owner had less MemAvailable than this test assumes"
    # its reported use rises by about what it wrote (tmpfs pages stay)
    risen = _wait_for(lambda: (u := client.job(owner).get("memory_used_mib")) is not None
                      and u - idle_used >= fill_mib * 3 // 4 and u, "the owner's rise",
                      daemon, 30)
    print(f"owner filled {fill_mib} MiB: used {idle_used} -> {risen} MiB "
          f"(+{risen - idle_used}) seen {time.monotonic() - filled_at:.1f} s after; "
          f"resident {client.job(owner)['memory_resident_mib']} MiB")
    assert risen - idle_used <= fill_mib + 64

    gave_back = _wait_for(lambda: [e for e in client.job(borrower)["events"]
                                   if "gave back" in (e["reason"] or "")],
                          "the borrower's give-back", daemon, 90)
    reasons = [e["reason"] or "" for e in client.job(borrower)["events"]]
    print("borrower:", *reasons, sep="\n  ")
    assert any(f"giving back {LENT_MIB} MiB of job {owner}: "
               "its owner's memory use rose" in r for r in reasons)
    assert "checkpointed" in gave_back[0]["reason"]

    views = daemon.wait_all_ended([owner, borrower], timeout=300)
    assert views[owner]["state"] == views[borrower]["state"] == "COMPLETED", views
    assert "".join(client.logs(owner)).split() == ["owner-idle", "owner-filled", str(fill_mib),
                                                   "owner-done"]
    ticks = [line for line in "".join(client.logs(borrower)).splitlines()
             if line.startswith("tick ")]
    assert ticks == [f"tick {i}" for i in range(TICKS)]
    states = [e["state"] for e in client.job(borrower)["events"] if not e.get("note")]
    assert "CHECKPOINTED" in states and states[-1] == "COMPLETED"
    assert daemon.query("SELECT COUNT(*) FROM memory_loans")[0][0] == 0
    # the borrower's reservation goes once its guest has gone (libvirt reaps QEMU a moment
    # after the power-off): waited for, bounded
    deadline = time.monotonic() + 60
    while daemon.reservations() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.reservations() == 0
    client.close()
    daemon.stop()
