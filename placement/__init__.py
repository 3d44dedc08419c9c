"""The placement engine: pure Python, no libvirt, no I/O, no import from vmjobs.

`placement.sim` (the trace simulator, `python -m placement.sim`) is not imported here: it is an
entry point, and importing it from the package would make `-m` warn.

Names are exported lazily (PEP 562 `__getattr__`): `from placement import Request` imports
`placement.model` alone, so a client that only describes a request (`vmjobs.spec`, used by
`vmjob submit`) does not load the engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_HOMES = {
    "Allocation": "placement.model",
    "Checkpoint": "placement.plans",
    "Cluster": "placement.cluster",
    "Conflict": "placement.errors",
    "Cpu": "placement.model",
    "Decision": "placement.results",
    "Device": "placement.model",
    "Explanation": "placement.results",
    "Host": "placement.model",
    "HostState": "placement.model",
    "HostUsage": "placement.results",
    "Migrate": "placement.plans",
    "NicUsage": "placement.results",
    "Node": "placement.model",
    "NodeShare": "placement.model",
    "NodeUsage": "placement.results",
    "NumaPolicy": "placement.model",
    "POLICIES": "placement.scorers",
    "Plan": "placement.plans",
    "Reason": "placement.results",
    "Repin": "placement.plans",
    "Request": "placement.model",
    "SwfJob": "placement.swf",
    "ThreadPolicy": "placement.model",
    "Trace": "placement.swf",
    "UnknownHost": "placement.errors",
    "UnknownJob": "placement.errors",
    "apply_plan": "placement.plans",
    "make_host": "placement.synthetic",
    "make_hosts": "placement.synthetic",
    "parse_swf": "placement.swf",
    "plan_rebalance": "placement.plans",
    "plan_to_fit": "placement.plans",
    "restrict": "placement.within",
}
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
    "restrict",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'placement' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and readers: what each name is
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
    from placement.results import (
        Decision,
        Explanation,
        HostUsage,
        NicUsage,
        NodeUsage,
        Reason,
    )
    from placement.scorers import POLICIES
    from placement.swf import SwfJob, Trace, parse_swf
    from placement.synthetic import make_host, make_hosts
    from placement.within import restrict
