"""Extracting untrusted tar archives on every Python vmjobs supports.

Python's own `data` extraction filter (PEP 706) exists from 3.11.4 on; Debian 12's Python is
3.11.2, where `extractall(filter=...)` is a TypeError. `extract_data` uses the filter where
it exists; where it does not, it applies the same rules itself before extracting: a member
must be a plain file or directory whose path stays inside the destination (links, devices,
fifos, absolute paths and `..` are refused), and what is written gets the caller's ownership
and no setuid/setgid/sticky or group/other write bits (the filter's `data` rules, see
https://docs.python.org/3/library/tarfile.html#tarfile.data_filter). Links, which the filter
allows when they point inside the destination, are refused by the fallback: simpler to get
right, and nothing vmjobs moves (job inputs, job outputs) needs them.
"""

from __future__ import annotations

import copy
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path


class RefusedMember(tarfile.TarError):
    """A member the `data` rules do not allow; the message is one line naming it.

    `kind` says which rule, the same with or without Python's filter: "absolute" (an absolute
    path), "outside" (a path leaving the destination), "link" (a link the rules refuse),
    "special" (a device, fifo or other non-data member)."""

    def __init__(self, tarinfo: tarfile.TarInfo, kind: str, reason: str) -> None:
        super().__init__(f"{tarinfo.name!r}: {reason}")
        self.tarinfo, self.kind, self.reason = tarinfo, kind, reason


# Python's filter errors (3.11.4+), by class name: the classes do not exist before.
_NATIVE_KINDS = {"AbsolutePathError": "absolute", "OutsideDestinationError": "outside",
                 "AbsoluteLinkError": "link", "LinkOutsideDestinationError": "link",
                 "SpecialFileError": "special"}


def has_data_filter() -> bool:
    """True when this Python's tarfile has the `data` extraction filter (3.11.4+, 3.12+)."""
    return hasattr(tarfile, "data_filter")


def member_refusal(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be extracted as plain data (None: it may).

    Only plain files and directories with a relative path that stays inside the destination
    pass; the caller adds the member's name to the reason.
    """
    name = member.name
    if name.startswith("/") or "\0" in name:
        return "absolute path refused"
    if ".." in name.split("/"):
        return "path leaves the output directory ('..')"
    if member.issym():
        return f"symlink to {member.linkname!r} refused"
    if member.islnk():
        return f"hardlink to {member.linkname!r} refused"
    if member.ischr() or member.isblk():
        return "device node refused"
    if member.isfifo():
        return "fifo refused"
    if not (member.isreg() or member.isdir()) or member.issparse():
        return f"unsupported member type {member.type!r} refused"
    if member.isreg() and not relative_path(member):
        return "a file without a name refused"
    return None


def relative_path(member: tarfile.TarInfo) -> str:
    """The member's path without `.` and empty components ("" for the top directory)."""
    return "/".join(p for p in member.name.split("/") if p not in ("", "."))


def extract_data(tar: tarfile.TarFile, dest: Path,
                 members: Iterable[tarfile.TarInfo] | None = None) -> None:
    """Extract `members` (default: all) of `tar` into the existing directory `dest` under
    the `data` rules.

    Raises RefusedMember (a tarfile.TarError) for a member the rules refuse — on the
    fallback path before anything is written — and tarfile.TarError/OSError as
    `extractall` does.
    """
    chosen = list(tar.getmembers() if members is None else members)
    if has_data_filter():
        try:
            tar.extractall(dest, members=chosen, filter="data")
        except tarfile.FilterError as exc:
            kind = _NATIVE_KINDS.get(type(exc).__name__, "special")
            raise RefusedMember(exc.tarinfo, kind, str(exc)) from None
        return
    tar.extractall(dest, members=[_as_data(m) for m in chosen if relative_path(m)])


def _as_data(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A copy of `member` as the `data` filter would leave it (TarInfo.replace is 3.11.4+)."""
    reason = member_refusal(member)
    if reason is not None:
        raise RefusedMember(member, _kind(member), reason)
    clean = copy.copy(member)
    clean.name = relative_path(member)
    clean.uid, clean.gid, clean.uname, clean.gname = os.geteuid(), os.getegid(), "", ""
    mode = member.mode & 0o755  # no setuid/setgid/sticky, no group/other write
    if member.isreg():
        if not mode & 0o100:
            mode &= ~0o111  # executable by others only if by the owner
        mode |= 0o600
    else:
        mode |= 0o700  # the filter leaves directories at the default; keep them usable
    clean.mode = mode
    return clean


def _kind(member: tarfile.TarInfo) -> str:
    if member.name.startswith("/"):
        return "absolute"
    if ".." in member.name.split("/"):
        return "outside"
    if member.issym() or member.islnk():
        return "link"
    return "special"
