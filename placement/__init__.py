"""The placement engine: pure Python, no libvirt, no I/O, no import from vmjobs."""

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

__all__ = [
    "Allocation",
    "Cpu",
    "Device",
    "Host",
    "HostState",
    "Node",
    "NodeShare",
    "NumaPolicy",
    "Request",
    "ThreadPolicy",
]
