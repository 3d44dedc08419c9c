"""A guest's CPU use as libvirt counts it (for the daemon's usage sampler)."""

from __future__ import annotations

from vmjobs.virt import Domain


def vcpu_time_ns(dom: Domain) -> int:
    """Total CPU time the guest's vCPU threads have run, summed over its vCPUs, in
    nanoseconds since its QEMU process started (`virDomainGetVcpus`' cpuTime; a migrated or
    restored guest's new process counts from 0 again). Emulator and I/O threads are not
    included: this is what the job itself ran. VirtError if the guest is gone or inactive."""
    info, _maps = dom.vcpus()
    return sum(int(cpu_time) for _number, _state, cpu_time, _cpu in info)


def vcpu_times_ns(dom: Domain) -> tuple[int, ...]:
    """`vcpu_time_ns` per vCPU, in vCPU order: element i is what vCPU i ran (ns)."""
    info, _maps = dom.vcpus()
    return tuple(int(cpu_time) for _number, _state, cpu_time, _cpu in sorted(info))


def memory_stats_kib(dom: Domain) -> dict[str, int]:
    """The guest's memory statistics as libvirt reports them (`virDomainMemoryStats`), in KiB:
    `actual` (the balloon's size: the memory the guest has) and `rss` (QEMU's resident memory
    on the host) from the host; `available` (the guest's MemTotal), `usable` (MemAvailable),
    `unused` (MemFree), `disk_caches` ... from the guest's balloon driver, only once it has
    reported (a balloon with a stats period; the guest's figures are untrusted). VirtError if
    the guest is gone or inactive."""
    return {str(key): int(value) for key, value in dom.memoryStats().items()}
