"""Which guests may ask to be resized from inside (`vmjob-ctl resize`): with the config's
`resize_from_guest: on`, a resizable job of no gang gets the control port and vmjob-ctl;
with it off (the default), a fixed-size guest or a gang member (whose port is its gang's)
gets neither, so vmjob-ctl there has no port to ask on (it exits 3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from placement import Allocation, NodeShare
from vmjobs import gang
from vmjobs.config import parse
from vmjobs.daemon import resizewire
from vmjobs.daemon.core import Daemon
from vmjobs.guest import GuestPlan
from vmjobs.image import Image
from vmjobs.jobs import JobRecord, JobState
from vmjobs.virt.domain_xml import Hotplug

URI = "test:///default"


def _daemon(tmp_path: Path, **extra: object) -> Daemon:
    return Daemon(parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                         "nic_backend": "emulated", "hosts": [{"name": "a", "uri": URI}],
                         "hotplug": True, **extra}, "test"))


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    on, off = _daemon(tmp_path / "on", resize_from_guest=True), _daemon(tmp_path / "off")
    yield on, off
    on.shutdown()
    off.shutdown()


def _plan(hotplug: Hotplug | None) -> GuestPlan:
    alloc = Allocation(host="a", cpus=(0,), memory_mib=256,
                       nodes=(NodeShare(0, (0,), 256),))
    image = Image("i", "", Path("/k"), Path("/i"), "6.1", 1)
    return GuestPlan(job_id="j1", owner="u", owner_uid=0, argv=("true",), env={},
                     allocation=alloc, image=image, virt_type="qemu", output_disk_mib=8,
                     hotplug=hotplug)


def _record(spec: dict[str, object] | None = None) -> JobRecord:
    return JobRecord("j1", "u", 0, JobState.PLACED, spec or {"argv": ["true"]})


def test_only_resizable_jobs_of_no_gang_get_the_port_when_the_admin_allows_it(
        daemons: tuple[Daemon, Daemon]) -> None:
    on, off = daemons
    resizable = _plan(Hotplug(max_cpus=2, max_extra_mib=256))
    given = resizewire.plan_for(on, _record(), resizable)
    assert given.control_channel
    ctl = given.extra_files["vmjob/bin/vmjob-ctl"]
    assert ctl[1] == 0o755 and ctl[0][:4] == b"\x7fELF"
    # the admin did not allow it
    assert resizewire.plan_for(off, _record(), resizable) == resizable
    assert not resizewire.serves(off, _record())
    # a guest that cannot grow, and a gang member (its port is its gang's)
    fixed = _plan(None)
    assert resizewire.plan_for(on, _record(), fixed) == fixed
    member = _record({"argv": ["true"], gang.KEY_ID: "g1", gang.KEY_INDEX: 0,
                      gang.KEY_SIZE: 2})
    assert resizewire.plan_for(on, member, resizable) == resizable
    assert not resizewire.serves(on, member)
