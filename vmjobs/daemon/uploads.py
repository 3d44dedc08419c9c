"""A job's `--input` directory, sent by the client as a tar before it submits.

The daemon runs as root and must never read a user's files itself (`--input /root` would
otherwise leak them), and a remote client's directory is not on the head node anyway: the
client packs the directory with its own permissions and uploads it. The archive is plain tar
(no compression) and every member is checked before anything is unpacked: only regular files
and directories (what the guest protocol copies into the guest), no sparse members (a 10 KB
archive could otherwise unpack to 3 GiB), and the unpacked total no larger than the archive.
It is then unpacked with tarfile's `data` filter: no absolute paths, no `..`. Uploads are the
uploader's: only the same uid can submit a job with one.

Room in the spool is shared by every user, so each upload is charged to its uploader: the
bytes of their unclaimed uploads plus the allocated bytes of the directories of their jobs
that have not ended must stay within `user_spool_quota`, and the spool must keep
`spool_min_free` free after it. Unclaimed uploads are removed `upload_ttl` seconds after they
arrived (a client that uploads and then fails to submit leaves one behind).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmjobs.daemon.server import ApiError
from vmjobs.errors import VmjobsError
from vmjobs.guest import JobFiles, make_job_dir

MAX_UPLOAD_BYTES = 16 << 30
CHUNK = 1 << 20
INPUT_DIR_MODE = 0o700
_FILTER_REASONS: dict[type[Exception], str] = {
    tarfile.AbsolutePathError: "an absolute path",
    tarfile.OutsideDestinationError: "leads outside the input directory",
    tarfile.AbsoluteLinkError: "links to an absolute path",
    tarfile.LinkOutsideDestinationError: "links outside the input directory",
    tarfile.SpecialFileError: "a special file",
}


@dataclass(frozen=True)
class Limits:
    """Per-user and spool-wide bounds on uploads (bytes, seconds)."""

    user_quota_bytes: int
    min_free_bytes: int
    ttl_s: float


@dataclass
class _Pending:
    uid: int
    charged_bytes: int
    at: float
    ready: bool = False


class Uploads:
    """The spool's `uploads/` directory (0700) and who owns what in it.

    `held_by(uid)` gives the directories of that user's jobs that have not ended; their
    allocated bytes count against the user's quota.
    """

    def __init__(self, spool: Path, limits: Limits,
                 held_by: Callable[[int], Iterable[Path]]) -> None:
        self.dir = spool / "uploads"
        self.limits = limits
        self._held_by = held_by
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._stop = threading.Event()
        # tokens live in memory: uploads from before a restart can never be claimed
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, mode=0o700)
        threading.Thread(target=self._sweep, name="upload-sweeper", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def receive(self, uid: int, body: BinaryIO, length: int | None) -> str:
        """Store one upload of `length` bytes for `uid`; its token.

        Raises ApiError 411 (no length), 413 (over the per-upload limit or the user's quota,
        or a member that would unpack larger than the archive), 507 (the spool lacks room),
        400 (a member the guest cannot take, or a damaged archive)."""
        if length is None:
            raise ApiError(411, "an upload needs a Content-Length")
        if length > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"input of {length} bytes is over the "
                                f"{MAX_UPLOAD_BYTES >> 30} GiB limit", code="too_large")
        self.drop_stale()
        token = secrets.token_hex(8)
        # charged twice while it arrives: the archive and what it unpacks to
        self._charge(uid, token, 2 * length)
        archive = self.dir / f"{token}.tar"
        dest = self.dir / token
        try:
            _copy_exactly(body, archive, length)
            with tarfile.open(archive, mode="r:") as tar:
                check_members(tar.getmembers(), length)
                dest.mkdir(mode=INPUT_DIR_MODE)
                tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            self._forget(token)
            # its own message names the spool's path: say what is wrong in the archive's terms
            raise ApiError(400, f"input refused: {exc.tarinfo.name}: "
                                f"{_FILTER_REASONS.get(type(exc), 'not allowed')}") from None
        except tarfile.TarError as exc:
            self._forget(token)
            raise ApiError(400, f"input refused: not a tar archive ({exc})") from None
        except OSError as exc:
            self._forget(token)
            raise ApiError(400, f"input refused: {exc.strerror}") from None
        except BaseException:
            self._forget(token)
            raise
        finally:
            archive.unlink(missing_ok=True)
        with self._lock:
            pending = self._pending[token]
            pending.charged_bytes = _allocated(dest)
            pending.ready = True
        return token

    def take(self, token: str, uid: int, dest: Path) -> None:
        """Move an upload to `dest` (a job's input directory); only its uploader may."""
        with self._lock:
            pending = self._pending.get(token)
            if pending is None or pending.uid != uid or not pending.ready:
                raise VmjobsError(f"no upload {token!r} of yours (uploads last "
                                  f"{self.limits.ttl_s:g} s until used, or until the daemon "
                                  "restarts)")
            del self._pending[token]
        make_job_dir(JobFiles(dest.parent))
        os.rename(self.dir / token, dest)

    def drop_stale(self) -> int:
        """Remove uploads unclaimed for longer than the TTL; how many went."""
        now = time.monotonic()
        with self._lock:
            stale = [t for t, p in self._pending.items()
                     if p.ready and now - p.at > self.limits.ttl_s]
            for token in stale:
                del self._pending[token]
        for token in stale:
            shutil.rmtree(self.dir / token, ignore_errors=True)
        return len(stale)

    def _sweep(self) -> None:
        interval = max(0.5, min(self.limits.ttl_s / 2, 30.0))
        while not self._stop.wait(interval):
            self.drop_stale()

    def _charge(self, uid: int, token: str, nbytes: int) -> None:
        """Book `nbytes` for `uid` if the quota and the spool's free space allow."""
        held = sum(_allocated(d) for d in self._held_by(uid))
        with self._lock:
            pending = sum(p.charged_bytes for p in self._pending.values() if p.uid == uid)
            used = held + pending
            quota = self.limits.user_quota_bytes
            if used + nbytes > quota:
                raise ApiError(413, f"input of {_mib(nbytes // 2)} refused: your uploads and "
                                    f"unfinished jobs hold {_mib(used)} of your {_mib(quota)} "
                                    "quota (user_spool_quota)", code="quota")
            free = shutil.disk_usage(self.dir).free
            if free - nbytes < self.limits.min_free_bytes:
                raise ApiError(507, f"input of {_mib(nbytes // 2)} refused: the spool has "
                                    f"{_mib(free)} free and keeps "
                                    f"{_mib(self.limits.min_free_bytes)} (spool_min_free)",
                               code="no_space")
            self._pending[token] = _Pending(uid, nbytes, time.monotonic())

    def _forget(self, token: str) -> None:
        with self._lock:
            self._pending.pop(token, None)
        shutil.rmtree(self.dir / token, ignore_errors=True)


def check_members(members: list[tarfile.TarInfo], archive_bytes: int) -> None:
    """Refuse, naming the member as the archive does, anything the guest protocol would
    refuse at start (`guest_protocol.input_entries`: only regular files and directories)
    and anything that would unpack larger than the archive: sparse members, or sizes that
    add up to more than `archive_bytes`. Raises ApiError (400 or 413)."""
    total = 0
    for member in members:
        if member.issparse():
            raise ApiError(413, f"input refused: {member.name} is a sparse file "
                                "(it would unpack larger than it was sent)", code="too_large")
        if member.issym():
            raise ApiError(400, f"input refused: {member.name} is a symlink; only regular "
                                "files and directories are copied into the guest")
        # a hard link (tar's way to pack a file with two names) unpacks to a regular file
        if not (member.isreg() or member.isdir() or member.islnk()):
            raise ApiError(400, f"input refused: {member.name} is not a regular file or "
                                "directory")
        total += member.size
    if total > archive_bytes:
        raise ApiError(413, f"input refused: its files add up to {total} bytes, more than "
                            f"the {archive_bytes}-byte archive holds", code="too_large")


def _allocated(path: Path) -> int:
    """Bytes a directory tree takes on disk (allocated blocks: a sparse file counts what it
    holds, not its length)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):  # a job's file going away meanwhile
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _copy_exactly(body: BinaryIO, path: Path, length: int) -> None:
    left = length
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while left:
            chunk = body.read(min(CHUNK, left))
            if not chunk:
                raise VmjobsError(f"upload ended after {length - left} of {length} bytes")
            out.write(chunk)
            left -= len(chunk)
