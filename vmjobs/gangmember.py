"""What makes a job's guest a gang member: the hook the gang code calls where a member starts.

`member_plan` adds to a member's `GuestPlan` its NIC on the gang network (vmjobs/gangnet.py),
the files the guest init configures it from (`/vmjob/net/`), `$VMJOB_PEERS` (`$VMJOB_NODE` and
`$VMJOB_NODES` are every member's, network or not: vmjobs.gang.gang_env), the control port
`org.vmjobs.ctl.0` and `/vmjob/bin/vmjob-ctl`
(images/vmjob-ctl.c, built static once per source by vmjobs/cbuild.py and shipped in the job's
archive, like vmjob-resume for warm starts). A member always starts cold: a warm template
cannot gain devices at restore.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vmjobs.cbuild import build_static
from vmjobs.gangnet import GangNet, bridge_nic, guest_env, guest_files
from vmjobs.guest import GuestPlan

CTL_SOURCE = "vmjob-ctl.c"


def vmjob_ctl(spool: Path) -> Path:
    """The static vmjob-ctl binary (built into `<spool>/cache/` if missing); VmjobsError if it
    cannot be built (no C compiler or no static libc)."""
    return build_static(CTL_SOURCE, spool / "cache", "a gang member's vmjob-ctl", "-Os")


def member_plan(plan: GuestPlan, net: GangNet, index: int, spool: Path) -> GuestPlan:
    """`plan` for member `index` of the gang whose network is `net`."""
    files = {f"vmjob/net/{name}": (data, 0o644) for name, data in guest_files(net, index).items()}
    files["vmjob/bin/vmjob-ctl"] = (vmjob_ctl(spool).read_bytes(), 0o755)
    return replace(plan, vmjob_env={**plan.vmjob_env, **guest_env(net)},
                   extra_files={**plan.extra_files, **files},
                   gang_nic=bridge_nic(net, index), control_channel=True)
