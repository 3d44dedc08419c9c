"""A job's `--input` directory, sent by the client as a tar before it submits.

The daemon runs as root and must never read a user's files itself (`--input /root` would
otherwise leak them), and a remote client's directory is not on the head node anyway: the
client packs the directory with its own permissions and uploads it. The archive is plain tar
(no compression, so its size bounds what it unpacks to) and is unpacked with tarfile's `data`
filter: no absolute paths, no `..`, no links out, no devices. Uploads are the uploader's: only
the same uid can submit a job with one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

from vmjobs.errors import VmjobsError
from vmjobs.safetar import extract_data

MAX_UPLOAD_BYTES = 16 << 30
CHUNK = 1 << 20
UNUSED_AFTER_S = 24 * 3600


class Uploads:
    def __init__(self, spool: Path) -> None:
        self.dir = spool / "uploads"
        self._lock = threading.Lock()
        self._owners: dict[str, tuple[int, float]] = {}
        # tokens live in memory: uploads from before a restart can never be claimed
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, mode=0o700)

    def receive(self, uid: int, body: BinaryIO, length: int | None) -> str:
        if length is None:
            raise VmjobsError("an upload needs a Content-Length")
        if length > MAX_UPLOAD_BYTES:
            raise VmjobsError(f"input of {length} bytes is over the {MAX_UPLOAD_BYTES >> 30} GiB "
                              "limit")
        self._drop_stale()
        token = secrets.token_hex(8)
        archive = self.dir / f"{token}.tar"
        dest = self.dir / token
        try:
            _copy_exactly(body, archive, length)
            dest.mkdir()
            try:
                with tarfile.open(archive, mode="r:") as tar:
                    extract_data(tar, dest)
            except (tarfile.TarError, OSError) as exc:
                raise VmjobsError(f"input refused: {exc}") from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            archive.unlink(missing_ok=True)
        with self._lock:
            self._owners[token] = (uid, time.monotonic())
        return token

    def take(self, token: str, uid: int, dest: Path) -> None:
        """Move an upload to `dest` (a job's input directory); only its uploader may."""
        with self._lock:
            owner = self._owners.get(token)
            if owner is None or owner[0] != uid:
                raise VmjobsError(f"no upload {token!r} of yours (uploads last until used or "
                                  "the daemon restarts)")
            del self._owners[token]
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.dir / token, dest)

    def _drop_stale(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [t for t, (_, at) in self._owners.items() if now - at > UNUSED_AFTER_S]
            for token in stale:
                del self._owners[token]
        for token in stale:
            shutil.rmtree(self.dir / token, ignore_errors=True)


def _copy_exactly(body: BinaryIO, path: Path, length: int) -> None:
    left = length
    with path.open("wb") as out:
        while left:
            chunk = body.read(min(CHUNK, left))
            if not chunk:
                raise VmjobsError(f"upload ended after {length - left} of {length} bytes")
            out.write(chunk)
            left -= len(chunk)
