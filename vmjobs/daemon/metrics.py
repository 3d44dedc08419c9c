"""Prometheus metrics, with the official client library, on an optional TCP port.

Counters and histograms are updated as things happen; gauges that describe the present (queue
length, jobs per state, cores per host and node) are read from the daemon when scraped, so
they can never drift from the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from placement import HostUsage
from vmjobs.jobs import JobState

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


@dataclass(frozen=True)
class JobCpu:
    """A job's held vCPU cores and the cores it used over its sampler window (None: not
    sampled yet, or sampling is off)."""

    job_id: str
    host: str
    held: int
    used: float | None
    held_by_node: tuple[tuple[int, int], ...] = ()  # (node, vCPU cores) of its allocation


@dataclass(frozen=True)
class JobMemory:
    """A job's held memory (MiB, by NUMA node) and its guest's last balloon reading (bytes;
    None: no reading yet, or the guest reports no use: see daemon/memuse.py)."""

    job_id: str
    host: str
    held_mib: int
    used_bytes: int | None
    resident_bytes: int | None
    held_by_node: tuple[tuple[int, int], ...] = ()  # (node, MiB) of its allocation


@dataclass(frozen=True)
class Present:
    """What the gauges show, read under the daemon's lock at scrape time."""

    jobs_by_state: dict[str, int]
    hosts_up: dict[str, bool]
    usage: list[HostUsage] = field(default_factory=list)
    cpu: list[JobCpu] = field(default_factory=list)
    lent: dict[str, int] = field(default_factory=dict)  # host -> cores lent to borrowers now
    memory: list[JobMemory] = field(default_factory=list)
    lent_memory_mib: dict[str, int] = field(default_factory=dict)  # host -> MiB lent now


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.wait = Histogram("vmjobs_queue_wait_seconds",
                              "Time from submission to the guest running", buckets=WAIT_BUCKETS,
                              registry=self.registry)
        self.latency = Histogram("vmjobs_stop_to_record_seconds",
                                 "Time from a guest's power-off (or STOPPED) event to its "
                                 "job's end being recorded", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ended = Counter("vmjobs_jobs_ended", "Jobs that ended, by final state",
                             ["state"], registry=self.registry)
        self.host_changes = Counter("vmjobs_host_transitions", "Hosts going down or up",
                                    ["host", "to"], registry=self.registry)
        self._server: Any = None

    def started(self, waited_s: float) -> None:
        self.wait.observe(max(waited_s, 0.0))

    def finished(self, state: JobState) -> None:
        self.ended.labels(state=state.value).inc()

    def event_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def host_changed(self, host: str, up: bool) -> None:
        self.host_changes.labels(host=host, to="up" if up else "down").inc()

    def watch(self, read: Callable[[], Present]) -> None:
        self.registry.register(_PresentCollector(read))

    def serve(self, port: int, address: str) -> None:
        self._server, _thread = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _PresentCollector(Collector):
    def __init__(self, read: Callable[[], Present]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        present = self.read()
        by_state = GaugeMetricFamily("vmjobs_jobs", "Jobs known to the store, by state",
                                     labels=["state"])
        for state in JobState:
            by_state.add_metric([state.value], present.jobs_by_state.get(state.value, 0))
        yield by_state
        yield GaugeMetricFamily("vmjobs_queue_length", "Jobs waiting in the queue",
                                value=present.jobs_by_state.get(JobState.QUEUED.value, 0))
        up = GaugeMetricFamily("vmjobs_host_up", "1 when the host's libvirt connection is up",
                               labels=["host"])
        for host, is_up in present.hosts_up.items():
            up.add_metric([host], 1 if is_up else 0)
        yield up
        used = GaugeMetricFamily("vmjobs_cpus_used", "Host cpus reserved by jobs",
                                 labels=["host", "node"])
        free = GaugeMetricFamily("vmjobs_cpus_free", "Host cpus a job could be given",
                                 labels=["host", "node"])
        mem_free = GaugeMetricFamily("vmjobs_memory_free_bytes", "Memory a job could be given",
                                     labels=["host", "node"])
        for usage in present.usage:
            for node in usage.nodes:
                labels = [usage.host, str(node.node)]
                used.add_metric(labels, node.cpus_total - node.cpus_free)
                free.add_metric(labels, node.cpus_free)
                mem_free.add_metric(labels, node.memory_free_mib << 20)
        yield used
        yield free
        yield mem_free
        yield from _cpu_use(present.cpu)
        lent = GaugeMetricFamily("vmjobs_host_cores_lent", "Cores running jobs hold and lend "
                                 "to --borrow jobs now (docs/borrowing.md)", labels=["host"])
        for host in present.hosts_up:
            lent.add_metric([host], present.lent.get(host, 0))
        yield lent
        yield from _memory_use(present.memory)
        lent_memory = GaugeMetricFamily(
            "vmjobs_host_memory_lent_bytes", "Memory running jobs hold and lend to --borrow "
            "jobs now (borrow.memory: balloon; docs/borrowing.md)", labels=["host"])
        for host in present.hosts_up:
            lent_memory.add_metric([host], present.lent_memory_mib.get(host, 0) << 20)
        yield lent_memory


def _cpu_use(jobs: list[JobCpu]) -> Iterator[GaugeMetricFamily]:
    """Held vs used cores per job, host and NUMA node (issue 13: what borrowing will lend)."""
    held = GaugeMetricFamily("vmjobs_job_cores_held", "vCPU cores a job holds (pinned)",
                             labels=["job", "host"])
    used = GaugeMetricFamily("vmjobs_job_cores_used", "Cores a job's vCPUs ran on average "
                             "over the sampler window (usage_window)", labels=["job", "host"])
    host_held = GaugeMetricFamily("vmjobs_host_cores_held",
                                  "vCPU cores held by running jobs", labels=["host"])
    host_used = GaugeMetricFamily("vmjobs_host_cores_used", "Cores the sampled jobs' vCPUs "
                                  "ran on average over the sampler window", labels=["host"])
    node_held = GaugeMetricFamily("vmjobs_node_cores_held",
                                  "vCPU cores held by running jobs", labels=["host", "node"])
    node_used = GaugeMetricFamily("vmjobs_node_cores_used", "Cores the sampled jobs' vCPUs "
                                  "ran, each job's use split over its nodes in proportion to "
                                  "its vCPUs there", labels=["host", "node"])
    for job in jobs:
        held.add_metric([job.job_id, job.host], job.held)
        if job.used is not None:
            used.add_metric([job.job_id, job.host], job.used)
    _totals(host_held, host_used, node_held, node_used,
            [(job.host, job.held, job.used, job.held_by_node) for job in jobs])
    yield from (held, used, host_held, host_used, node_held, node_used)


def _totals(host_held: GaugeMetricFamily, host_used: GaugeMetricFamily,
            node_held: GaugeMetricFamily, node_used: GaugeMetricFamily,
            jobs: list[tuple[str, float, float | None, tuple[tuple[int, int], ...]]]) -> None:
    """Add per-host and per-NUMA-node sums of `jobs` (host, held, used or None, (node, held
    there) pairs) to the four gauges; a job's use is split over its nodes in proportion to
    what it holds on each. Cores and memory alike (the unit is the caller's)."""
    by_host: dict[str, list[float]] = {}
    by_node: dict[tuple[str, int], list[float]] = {}
    for host, held, used, held_by_node in jobs:
        totals = by_host.setdefault(host, [0.0, 0.0])
        totals[0] += held
        if used is not None:
            totals[1] += used
        for node, there in held_by_node:
            node_totals = by_node.setdefault((host, node), [0.0, 0.0])
            node_totals[0] += there
            if used is not None and held:
                node_totals[1] += used * there / held
    for host, (h, u) in sorted(by_host.items()):
        host_held.add_metric([host], h)
        host_used.add_metric([host], u)
    for (host, node), (h, u) in sorted(by_node.items()):
        node_held.add_metric([host, str(node)], h)
        node_used.add_metric([host, str(node)], u)


def _memory_use(jobs: list[JobMemory]) -> Iterator[GaugeMetricFamily]:
    """Held vs used memory per job, host and NUMA node, from the guests' balloons (issue 13:
    what `borrow.memory: balloon` may lend). `used` is the last reading (a level, not a rate);
    a job without one counts as held, not used."""
    held = GaugeMetricFamily("vmjobs_job_memory_held_bytes", "Memory a job's guest has",
                             labels=["job", "host"])
    used = GaugeMetricFamily("vmjobs_job_memory_used_bytes", "Memory the guest cannot give up "
                             "without swapping: held - MemAvailable, as its balloon last "
                             "reported", labels=["job", "host"])
    resident = GaugeMetricFamily("vmjobs_job_memory_resident_bytes", "Host memory the job's "
                                 "QEMU process has resident (rss)", labels=["job", "host"])
    host_held = GaugeMetricFamily("vmjobs_host_memory_held_bytes",
                                  "Memory held by running jobs", labels=["host"])
    host_used = GaugeMetricFamily("vmjobs_host_memory_used_bytes", "Memory the running jobs' "
                                  "guests use, as their balloons last reported", labels=["host"])
    node_held = GaugeMetricFamily("vmjobs_node_memory_held_bytes",
                                  "Memory held by running jobs", labels=["host", "node"])
    node_used = GaugeMetricFamily("vmjobs_node_memory_used_bytes", "Memory the running jobs' "
                                  "guests use, each job's use split over its nodes in "
                                  "proportion to its memory there", labels=["host", "node"])
    for job in jobs:
        held.add_metric([job.job_id, job.host], job.held_mib << 20)
        if job.used_bytes is not None:
            used.add_metric([job.job_id, job.host], job.used_bytes)
        if job.resident_bytes is not None:
            resident.add_metric([job.job_id, job.host], job.resident_bytes)
    _totals(host_held, host_used, node_held, node_used,
            [(job.host, job.held_mib << 20, job.used_bytes,
              tuple((node, mib << 20) for node, mib in job.held_by_node)) for job in jobs])
    yield from (held, used, resident, host_held, host_used, node_held, node_used)
