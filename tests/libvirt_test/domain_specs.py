"""Example jobs whose domain XML the golden files hold (shared by unit and test-driver tests).

The hosts behind them are the two-socket SMT host of tests/data/caps-2socket-smt.xml: node 0 has
cpus 0-7,16-23 and the X710 at 0000:3b:00.0, node 1 cpus 8-15,24-31 and the X710 at 0000:af:00.1;
cpus 0 and 16 (one core) are reserved for the OS and the emulator threads.
"""

from __future__ import annotations

from pathlib import Path

from placement import Allocation, NodeShare
from vmjobs.virt.domain_xml import DomainSpec, Nic, guest_nic_address

SPOOL = Path("/var/lib/vmjobs")
IMAGE = SPOOL / "images" / "3f9a0c1d2e4b"
KERNEL = IMAGE / "vmlinux"  # the uncompressed kernel, booted through PVH
FIRMWARE = IMAGE / "qboot.rom"


def _spec(job_id: str, virt_type: str, allocation: Allocation, nics: tuple[str, ...] = (),
          emulator_cpus: frozenset[int] = frozenset()) -> DomainSpec:
    job_dir = SPOOL / "jobs" / job_id
    return DomainSpec(
        name=f"vmjob-{job_id}", job_id=job_id, owner="alice", owner_uid=1000,
        virt_type=virt_type, allocation=allocation, kernel=KERNEL, initrd=job_dir / "initrd",
        console_log=job_dir / f"console.{allocation.host}.log",
        output_disk=job_dir / "output.raw", emulator_cpus=emulator_cpus, loader=FIRMWARE,
        nics=tuple(Nic(guest_nic_address(i), device) for i, device in enumerate(nics)),
    )


def one_node_emulated_nic() -> DomainSpec:
    """(a) 2 vCPUs and 1 GiB on host node 1, one emulated NIC, TCG, emulator on the job's cpus."""
    allocation = Allocation(
        host="node-a", cpus=(9, 10), memory_mib=1024,
        nodes=(NodeShare(node=1, cpus=(9, 10), memory_mib=1024),),
        devices=("emulated:enic0",),
    )
    return _spec("0a1b2c3d", "qemu", allocation, nics=allocation.devices)


def two_nodes_vfio_hugepages() -> DomainSpec:
    """(b) 4 vCPUs spanning both nodes, 2 vfio NICs, 2M hugepages, emulator on reserved cpus."""
    allocation = Allocation(
        host="node-b", cpus=(6, 7, 8, 9), memory_mib=8192,
        nodes=(NodeShare(node=0, cpus=(6, 7), memory_mib=4096),
               NodeShare(node=1, cpus=(8, 9), memory_mib=4096)),
        devices=("0000:3b:00.0", "0000:af:00.1"),
        hugepage_kib=2048,
    )
    return _spec("deadbeef", "kvm", allocation, nics=allocation.devices,
                 emulator_cpus=frozenset({0, 16}))


def one_node_hugepages_isolated() -> DomainSpec:
    """(c) 2 vCPUs on node 1 with 1G hugepages, no NICs, SMT siblings kept idle."""
    allocation = Allocation(
        host="node-b", cpus=(11, 12), memory_mib=2048,
        nodes=(NodeShare(node=1, cpus=(11, 12), memory_mib=2048),),
        hugepage_kib=1048576, idle_cpus=(27, 28),
    )
    return _spec("c0ffee00", "kvm", allocation, emulator_cpus=frozenset({0, 16}))


# name of the golden file (tests/data/domain-<name>.xml) -> the spec it holds
SPECS = {
    "1node-emulated-nic": one_node_emulated_nic,
    "2nodes-vfio-hugepages": two_nodes_vfio_hugepages,
    "1node-hugepages-isolated": one_node_hugepages_isolated,
}
