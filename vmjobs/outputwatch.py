"""Wake a follower of a job's output when its output files change, not on a poll interval.

QEMU writes the job's output straight to `<job>/output.<n>.out` (domain_xml.output_channel):
inotify on the job's directory says when one of them grew or a new one appeared. Whoever
knows that the job ended (a libvirt event, the daemon's state) calls `wake()`. `wait()` returns
on either, or after its timeout, which is only a safety net (an event never lost is assumed
nowhere).

inotify sees only the writes this kernel makes: on a network filesystem (NFS, CIFS, Ceph,
9p, FUSE) a job running on another host writes its files unseen, so there `wait()` never
sleeps longer than REMOTE_POLL_S.

inotify_simple (a thin, maintained wrapper of the three inotify calls) rather than ctypes of
our own: it is one small pure-Python module with no dependencies.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from pathlib import Path
from types import TracebackType

from inotify_simple import INotify
from inotify_simple import flags as in_flags

# Changes that can bring new output: a write, a new file (the next QEMU process of a moved
# job), one renamed in; and the directory's own end.
_MASK = (in_flags.MODIFY | in_flags.CREATE | in_flags.MOVED_TO | in_flags.CLOSE_WRITE
         | in_flags.DELETE_SELF)
REMOTE_POLL_S = 0.1
# statfs(2) f_type names from /proc/self/mountinfo whose writes another host can make
_REMOTE_FS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "9p", "fuse", "glusterfs", "lustre",
              "gpfs", "beegfs")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on ("ext4", "nfs4", "fuse.sshfs"...), from the
    mount with the longest mount point containing it in /proc/self/mountinfo (proc(5));
    "" if unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = fields[fields.index("-") + 1]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def is_remote(path: Path) -> bool:
    return filesystem_type(path).split(".")[0] in _REMOTE_FS


class OutputWatch:
    """One follower's wake-up: inotify on a job's directory plus a self-pipe for `wake()`.

    Level-triggered: a change or a `wake()` that happens before `wait()` is called makes it
    return at once, so a follower that reads, finds nothing, then waits never misses one.
    Not shared between threads, except `wake()`, which any thread may call.
    """

    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        self._inotify = INotify()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = threading.Lock()  # a wake() from another thread never meets close()
        self._closed = False
        self._watching = False
        self._cap = REMOTE_POLL_S if is_remote(job_dir.parent) else None
        self._arm()

    def _arm(self) -> None:
        """Watch the directory once it exists (a queued job has none yet: its launch, which
        creates it, wakes the follower, which then arms)."""
        if self._watching:
            return
        try:
            self._inotify.add_watch(self.dir, _MASK)
            self._watching = True
        except FileNotFoundError:
            pass

    def wait(self, timeout_s: float) -> bool:
        """Block until an output file changed, `wake()` was called, or `timeout_s` passed;
        return whether something happened (False: the timeout)."""
        self._arm()
        if self._cap is not None:
            timeout_s = min(timeout_s, self._cap)
        ready, _, _ = select.select([self._inotify.fileno(), self._wake_r], [], [],
                                   max(0.0, timeout_s))
        happened = False
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            happened = True
        if self._inotify.fileno() in ready:
            for event in self._inotify.read(timeout=0):
                if event.mask & (in_flags.DELETE_SELF | in_flags.IGNORED):
                    self._watching = False  # the directory went (a job forgotten)
                    happened = True
                elif event.name.startswith("output."):
                    happened = True  # console and other files change without new output
        return happened

    def wake(self) -> None:
        """Make the current or next `wait()` return (the job ended, its state changed)."""
        with self._closing:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: a wake is pending anyway
                os.write(self._wake_w, b"!")

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._inotify.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def __enter__(self) -> OutputWatch:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
