"""The placement engine: pure Python, no libvirt, no I/O, no import from vmjobs."""

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
from placement.results import Decision, Explanation, HostUsage, NodeUsage, Reason
from placement.scorers import POLICIES

__all__ = [
    "POLICIES",
    "Allocation",
    "Cluster",
    "Conflict",
    "Cpu",
    "Decision",
    "Device",
    "Explanation",
    "Host",
    "HostState",
    "HostUsage",
    "Node",
    "NodeShare",
    "NodeUsage",
    "NumaPolicy",
    "Reason",
    "Request",
    "ThreadPolicy",
    "UnknownHost",
    "UnknownJob",
]
