"""vmjobs.virt.stats against libvirt's test driver: the vCPU time a running domain reports."""

from __future__ import annotations

import libvirt
import pytest

from vmjobs.virt import VirtError
from vmjobs.virt.stats import vcpu_time_ns


def test_vcpu_time_sums_the_vcpus(default_conn: libvirt.virConnect) -> None:
    dom = default_conn.lookupByName("test")  # the test driver's running 2-vCPU domain
    info, _maps = dom.vcpus()
    assert vcpu_time_ns(dom) >= sum(cpu_time for _n, _s, cpu_time, _c in info) > 0


def test_vcpu_time_of_a_stopped_domain_raises(default_conn: libvirt.virConnect) -> None:
    dom = default_conn.lookupByName("test")
    dom.destroy()
    try:
        with pytest.raises(VirtError):
            vcpu_time_ns(dom)
    finally:
        dom.create()
