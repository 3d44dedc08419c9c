"""Who is calling, and what they may do. The uid comes from the kernel, never from the request.

`SO_PEERCRED` on the accepted unix socket gives the uid of the process that connected. Through
SSH (`--url ssh://user@head`) that process is the remote user's sshd session on the head, so
the uid is the SSH user's. Root and members of the config's `admin_group` act on every job;
everyone else on their own.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from vmjobs.jobs import JobRecord

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Caller:
    uid: int
    name: str
    admin: bool


def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return uid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"  # a uid without a passwd entry (e.g. from a container)


def caller(uid: int, admin_group: str | None) -> Caller:
    name = user_name(uid)
    return Caller(uid=uid, name=name, admin=uid == 0 or in_group(uid, admin_group))


def in_group(uid: int, group: str | None) -> bool:
    """Membership as the system sees it now: primary group or supplementary member list."""
    if not group:
        return False
    try:
        gid = grp.getgrnam(group).gr_gid
        entry = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(entry.pw_name, entry.pw_gid)


def may_act(who: Caller, job: JobRecord) -> bool:
    return who.admin or job.uid == who.uid


def denial(who: Caller, job: JobRecord) -> str:
    return f"job {job.id} belongs to {job.owner}; you are {who.name}"
