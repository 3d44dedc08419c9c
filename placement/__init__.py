"""The placement engine: pure Python, no libvirt, no I/O, no import from vmjobs.

`placement.sim` (the trace simulator, `python -m placement.sim`) is not imported here: it is an
entry point, and importing it from the package would make `-m` warn.
"""

from placement.cluster import Cluster
from placement.errors import Conflict, UnknownHost, UnknownJob
from placement.model import (
    Allocation,
    Cpu,
    Device,
    Host,
    HostState,
    Node,
    NodeShare,
    NumaPolicy,
    Request,
    ThreadPolicy,
)
from placement.plans import (
    Checkpoint,
    Migrate,
    Plan,
    Repin,
    apply_plan,
    plan_rebalance,
    plan_to_fit,
)
from placement.results import Decision, Explanation, HostUsage, NicUsage, NodeUsage, Reason
from placement.scorers import POLICIES
from placement.swf import SwfJob, Trace, parse_swf
from placement.synthetic import make_host, make_hosts

__all__ = [
    "POLICIES",
    "Allocation",
    "Checkpoint",
    "Cluster",
    "Conflict",
    "Cpu",
    "Decision",
    "Device",
    "Explanation",
    "Host",
    "HostState",
    "HostUsage",
    "Migrate",
    "NicUsage",
    "Node",
    "NodeShare",
    "NodeUsage",
    "NumaPolicy",
    "Plan",
    "Reason",
    "Repin",
    "Request",
    "SwfJob",
    "ThreadPolicy",
    "Trace",
    "UnknownHost",
    "UnknownJob",
    "apply_plan",
    "make_host",
    "make_hosts",
    "parse_swf",
    "plan_rebalance",
    "plan_to_fit",
]
