"""`vmjob run` end to end: real guests under the real libvirtd, driven through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from tests.guest.conftest import URI, Env, our_domains
from vmjobs.store import Store

pytestmark = pytest.mark.guest


def reservations(env: Env) -> int:
    store = Store(env.spool / "state.db")
    try:
        return store.reservation_count()
    finally:
        store.close()


def job_dirs(env: Env) -> set[str]:
    jobs = env.spool / "jobs"
    return {p.name for p in jobs.iterdir()} if jobs.exists() else set()


def assert_nothing_left(env: Env) -> None:
    assert our_domains() == []
    assert reservations(env) == 0


def test_output_streams_and_exit_code_zero(guest_env: Env) -> None:
    result = guest_env.vmjob("run", "--", "sh", "-c", "echo one; echo 'two  spaced'")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "one\ntwo  spaced\n"
    assert_nothing_left(guest_env)


def test_exit_code_three_is_propagated(guest_env: Env) -> None:
    result = guest_env.vmjob("run", "--", "sh", "-c", "echo failing >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert "failing" in result.stdout  # stderr of the job goes to the console too
    assert_nothing_left(guest_env)


def test_guest_sees_requested_cpus_and_memory(guest_env: Env) -> None:
    result = guest_env.vmjob(
        "run", "--cpus", "2", "--mem", "384M", "--env", "GREETING=hi there", "--",
        "sh", "-c", 'nproc; grep MemTotal /proc/meminfo; echo "$VMJOB_CPUS $VMJOB_MEM $GREETING"',
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2"
    mem_kib = int(lines[1].split()[1])
    # The kernel keeps its own image and reserved areas out of MemTotal.
    assert 330 * 1024 <= mem_kib <= 384 * 1024
    assert lines[2] == "2 384 hi there"


def test_vcpu_threads_are_pinned_to_the_reserved_cpus(guest_env: Env) -> None:
    proc = guest_env.popen("run", "--cpus", "2", "--", "sh", "-c", "echo ready; sleep 20")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        conn = libvirt.open(URI)
        try:
            [dom] = [d for d in conn.listAllDomains() if d.name().startswith("vmjob-")]
            job_id = dom.name().removeprefix("vmjob-")
            store = Store(guest_env.spool / "state.db")
            held = {cpu for cpu, owner in store.reserved_cpus("local").items() if owner == job_id}
            alloc = store.job(job_id).allocation  # type: ignore[union-attr]
            store.close()
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(
                dom, '{"execute": "query-cpus-fast"}', 0))
            threads = {c["cpu-index"]: c["thread-id"] for c in reply["return"]}
            assert len(threads) == 2
            affinity = {i: os.sched_getaffinity(tid) for i, tid in threads.items()}
            # vCPU i runs exactly on host cpu allocation.cpus[i], and those are the reserved ones
            assert {i: {c} for i, c in enumerate(alloc["cpus"])} == affinity
            assert set(alloc["cpus"]) == held
        finally:
            conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert_nothing_left(guest_env)


def test_input_and_output_round_trip(guest_env: Env, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "results"
    (inp / "sub dir").mkdir(parents=True)
    (inp / "sub dir" / "a b.txt").write_text("spaces survive\n")
    big = os.urandom(10 * 1024 * 1024)
    (inp / "big.bin").write_bytes(big)
    result = guest_env.vmjob(
        "run", "--mem", "512M", "--input", str(inp), "--output", str(out), "--",
        "sh", "-c", 'cat "sub dir/a b.txt"; mkdir -p "out/copy dir";'
                    ' cp "sub dir/a b.txt" big.bin "out/copy dir/"; echo done > out/status',
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "spaces survive\n"
    assert (out / "copy dir" / "a b.txt").read_text() == "spaces survive\n"
    copied = (out / "copy dir" / "big.bin").read_bytes()
    assert hashlib.sha256(copied).digest() == hashlib.sha256(big).digest()
    assert (out / "status").read_text() == "done\n"
    # The spool keeps its own copy under the job's directory.
    [job] = [d for d in (guest_env.spool / "jobs").iterdir() if (d / "out" / "status").exists()
             and (d / "out" / "copy dir").exists()]
    assert (job / "out" / "copy dir" / "big.bin").stat().st_size == len(big)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_destroys_guest_and_releases(guest_env: Env, sig: int, code: int) -> None:
    proc = guest_env.popen("run", "--", "sh", "-c", "echo ready; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert reservations(guest_env) == 1
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "cancelled" in err
    assert_nothing_left(guest_env)


def test_timeout_stops_job_and_says_so(guest_env: Env) -> None:
    started = time.monotonic()
    result = guest_env.vmjob("run", "--timeout", "10s", "--", "sh", "-c", "echo ready; sleep 120")
    assert result.returncode == 124
    assert "ready" in result.stdout
    assert "TIMEOUT: time limit of 10s reached; guest stopped" in result.stderr
    assert time.monotonic() - started < 60
    assert_nothing_left(guest_env)


def test_two_concurrent_runs_get_disjoint_cpus(guest_env: Env) -> None:
    results: dict[int, tuple[int, str]] = {}
    during: list[dict[int, str]] = []

    def one(i: int) -> None:
        r = guest_env.vmjob("run", "--cpus", "1", "--", "sh", "-c", "echo ready; sleep 6")
        results[i] = (r.returncode, r.stderr)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(our_domains()) < 2:
        time.sleep(0.2)
    store = Store(guest_env.spool / "state.db")
    during.append(store.reserved_cpus("local"))
    store.close()
    for t in threads:
        t.join()
    assert [code for code, _ in results.values()] == [0, 0], results
    cpus = [re.search(r"cpus (\S+) ", err).group(1) for _, err in results.values()]  # type: ignore[union-attr]
    assert len(set(cpus)) == 2
    # While both ran, each held its own cpu.
    assert len(during[0]) == 2 and len(set(during[0].values())) == 2
    assert_nothing_left(guest_env)


def test_emulated_nic_appears_at_nic0(guest_env: Env) -> None:
    result = guest_env.vmjob(
        "run", "--nics", "2", "--", "sh", "-c",
        'echo "$NIC0 $NIC1"; cat /sys/bus/pci/devices/$NIC0/class; ls /sys/bus/pci/devices/$NIC1',
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "0000:00:10.0 0000:00:11.0"
    assert lines[1] == "0x020000"  # an Ethernet controller sits at the address in $NIC0
    assert_nothing_left(guest_env)


def test_killed_run_is_reaped_by_the_next_run(guest_env: Env) -> None:
    proc = guest_env.popen("run", "--", "sh", "-c", "echo ready; sleep 120")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()  # SIGKILL: no chance to clean up; the guest and the reservation stay
    proc.communicate(timeout=30)
    assert len(our_domains()) == 1
    assert reservations(guest_env) == 1
    result = guest_env.vmjob("run", "--", "echo", "next")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "next\n"
    assert "its vmjob process had died" in result.stderr
    assert_nothing_left(guest_env)
    store = Store(guest_env.spool / "state.db")
    states = [j.state.value for j in store.jobs()]
    store.close()
    assert "LOST" in states
