"""Usage benchmark: `vmjob usage`'s store query and computation on a large store.

    python bench/usage.py [--jobs N] [--days D]

Fills a fresh store (through the store's API) with N finished jobs of 3 events each
(placed, running, completed), spread evenly over the last D days (event times moved back
afterwards), then times
`Store.usage_histories(since)` + `usage.report` for --since 1h, 24h and D days, with the
`events_time` index and, as the baseline in the same run, without it. Figures, not
assertions: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the repository before bench/ (whose placement.py would shadow the package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from placement import Allocation, NodeShare, Request  # noqa: E402
from vmjobs import usage  # noqa: E402
from vmjobs.jobs import JobRecord, JobState  # noqa: E402
from vmjobs.store import Store  # noqa: E402

CAPACITY = {f"h{i}": {0: 32, 1: 32} for i in range(16)}


def fill(store: Store, jobs: int, days: float) -> None:
    now = time.time()
    req = Request(cpus=2, memory_mib=256)
    store.db.execute("BEGIN")
    for i in range(jobs):
        host = f"h{i % 16}"
        cpus = ((i // 16) % 16 * 2, (i // 16) % 16 * 2 + 1)
        alloc = Allocation(host=host, cpus=cpus, memory_mib=256,
                           nodes=(NodeShare(node=0, cpus=cpus, memory_mib=256),))
        job_id = f"j{i:07d}"
        store.add_job(JobRecord(id=job_id, owner=f"u{i % 50}", uid=1000 + i % 50,
                                state=JobState.PLACED, spec={"argv": ["true"]}),
                      req, alloc, "bench")
        store.db.execute("UPDATE jobs SET state = 'STARTING' WHERE id = ?", (job_id,))
        store._event(job_id, JobState.RUNNING, host, "bench", now)
        store._release(job_id)
        store._event(job_id, JobState.COMPLETED, host, "bench", now)
        store.db.execute("UPDATE jobs SET state = 'COMPLETED' WHERE id = ?", (job_id,))
    store.db.execute("COMMIT")
    # spread the jobs over `days`: job i starts at its slot and runs for 10 minutes
    span = days * 86400
    store.db.execute(
        "UPDATE events SET time = ? - ? * (1.0 - CAST(substr(job_id, 2) AS REAL) / ?)"
        " + CASE state WHEN 'COMPLETED' THEN 600 ELSE 0 END", (now - 600, span, jobs))
    store.db.execute("UPDATE jobs SET created = (SELECT MIN(time) FROM events"
                     " WHERE events.job_id = jobs.id)")


def timed(store: Store, since_s: float, runs: int = 5) -> tuple[float, int]:
    samples = []
    found = 0
    for _ in range(runs):
        started = time.perf_counter()
        now = time.time()
        histories = store.usage_histories(now - since_s)
        usage.report(histories, CAPACITY, now, now - since_s, "host")
        usage.report(histories, CAPACITY, now, now - since_s, "user")
        samples.append(time.perf_counter() - started)
        found = len(histories)
    return statistics.median(samples), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.db")
        started = time.perf_counter()
        fill(store, args.jobs, args.days)
        events = store.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        print(f"store: {args.jobs} jobs, {events} events over {args.days:g} days "
              f"(filled in {time.perf_counter() - started:.1f}s)")
        windows = [("1h", 3600.0), ("24h", 86400.0), (f"{args.days:g}d", args.days * 86400)]
        indexed = {label: timed(store, seconds) for label, seconds in windows}
        store.db.execute("DROP INDEX events_time")
        bare = {label: timed(store, seconds, runs=3) for label, seconds in windows}
        print(f"{'--since':>8} {'jobs read':>10} {'indexed (s)':>12} {'no index (s)':>13} "
              f"{'ratio':>6}")
        for label, _seconds in windows:
            (t_i, n), (t_b, _n) = indexed[label], bare[label]
            print(f"{label:>8} {n:>10} {t_i:>12.4f} {t_b:>13.4f} {t_b / t_i:>6.1f}")
        store.close()


if __name__ == "__main__":
    main()
