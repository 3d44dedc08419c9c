"""`vmjob serve`: wire the pieces together and run until SIGTERM or SIGINT.

Order matters: libvirt's event loop before the first connection (or no events arrive); the
socket claimed before recovery (clients queue in its backlog instead of being refused); the
store reconciled with the hosts before the scheduler or any request may change it.
Stopping the daemon leaves guests running: the next start finds them again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import threading
from dataclasses import replace
from pathlib import Path

from vmjobs.config import Config, system_warnings
from vmjobs.daemon import hostloss, lending, moves, scheduler
from vmjobs.daemon.api import Api
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.metrics import JobCpu, JobMemory, Present
from vmjobs.daemon.recovery import reconcile_host, recover
from vmjobs.daemon.server import Limits, UnixHTTPServer
from vmjobs.errors import VmjobsError
from vmjobs.virt.events import start_event_loop

log = logging.getLogger("vmjobs.daemon")


def present(daemon: Daemon) -> Present:
    with daemon.lock:
        counts = daemon.store.count_by_state()
        cluster = daemon.live.cluster()
        usage = [cluster.free(name) for name in cluster.hosts]
        held = daemon.store.held()
        lent: dict[str, int] = {}
        for loan in daemon.store.loans():
            lent[loan.host] = lent.get(loan.host, 0) + 1
        lent_memory: dict[str, int] = {}
        for mem_loan in daemon.store.memory_loans():
            lent_memory[mem_loan.host] = lent_memory.get(mem_loan.host, 0) + mem_loan.mib
    cpu = []
    memory = []
    for h in held:
        use = daemon.sampler.used(h.job_id)
        cpu.append(JobCpu(h.job_id, h.allocation.host, len(h.allocation.cpus),
                          None if use is None else use.cores,
                          tuple((n.node, len(n.cpus)) for n in h.allocation.nodes)))
        reading = daemon.sampler.memory.latest(h.job_id)
        memory.append(JobMemory(
            h.job_id, h.allocation.host, h.allocation.memory_mib,
            None if reading is None or reading.used_kib is None else reading.used_kib << 10,
            None if reading is None or reading.resident_kib is None
            else reading.resident_kib << 10,
            tuple((n.node, n.memory_mib) for n in h.allocation.nodes)))
    return Present(
        jobs_by_state=counts,
        hosts_up={h.name: daemon.hosts.is_up(h.name) for h in daemon.config.hosts},
        usage=usage,
        cpu=cpu,
        lent=lent,
        memory=memory,
        lent_memory_mib=lent_memory,
    )


def claim_spool(spool: Path) -> int:
    """One daemon per spool: two would each reconcile, requeue and collect the other's jobs.
    The lock is held for the life of the process (the kernel drops it even on kill -9)."""
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / "vmjobd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise VmjobsError(f"another vmjob daemon (pid {holder}) already serves the spool "
                          f"{spool}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (every connection is a descriptor; the
    usual soft 1024 let one user's 1,200 idle connections lock everyone out). The soft limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_limits(config: Config, nofile: int) -> Limits:
    wanted = Limits(total=config.max_connections, per_user=config.max_connections_per_user,
                    request_timeout_s=config.request_timeout_s)
    limits = wanted.fit_to_fds(nofile)
    if limits != wanted:
        log.warning("open-files limit %d: at most %d user connections (max_connections %d)",
                    nofile, limits.total, wanted.total)
    return limits


def resize_from_guest(daemon: Daemon, job_id: str, cpus: int | None,
                      memory_mib: int | None) -> str:
    """A guest's `vmjob-ctl resize` (vmjobs/guestresize.py): its owner's `POST
    /v1/jobs/{id}/resize`; the result's detail. VmjobsError as that request's."""
    lending.before_resize(daemon, job_id)
    return moves.resize(daemon, job_id, cpus, memory_mib).detail


def serve(config: Config, socket_path: Path, metrics_port: int | None = None,
          metrics_address: str = "127.0.0.1") -> None:
    config = replace(config, socket=socket_path)  # what `status` reports
    for warning in system_warnings(config):
        log.warning("%s", warning)
    limits = connection_limits(config, raise_open_files_limit())
    claim_spool(config.spool)
    start_event_loop()
    daemon = Daemon(config)
    daemon.on_host_up = lambda host: reconcile_host(daemon, host)
    daemon.on_job_lost = lambda record, why: hostloss.settle_lost(daemon, record, why)
    daemon.guest_resize = lambda job_id, cpus, mem: resize_from_guest(daemon, job_id, cpus,
                                                                      mem)
    api = Api(daemon)
    server = UnixHTTPServer(socket_path, api.routes(), config.admin_group, limits)
    try:
        daemon.hosts.connect_all()
        recover(daemon)
        with daemon.lock:  # the live cluster model, from the store as recovery left it
            daemon.live.rebuild()
        daemon.metrics.watch(lambda: present(daemon))
        if metrics_port is not None:
            daemon.metrics.serve(metrics_port, metrics_address)
            log.info("metrics on http://%s:%d/metrics", metrics_address, metrics_port)
        for target, name in ((lambda: scheduler.run(daemon), "scheduler"),
                             (daemon.notes_loop, "notes"), (daemon.watch_output, "output"),
                             (hostloss.Checkpointer(daemon).run, "checkpointer")):
            threading.Thread(target=target, name=name, daemon=True).start()
        if config.usage_sample_interval_s > 0:
            lending.start_sampling(daemon)

        def stop(signum: int, _frame: object) -> None:
            log.info("%s: stopping (jobs keep running)", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("listening on %s", socket_path)
        server.serve_forever()
    finally:
        daemon.shutdown()
        daemon.metrics.close()
        server.server_close()
        socket_path.unlink(missing_ok=True)
