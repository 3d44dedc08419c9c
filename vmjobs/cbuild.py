"""Small static C programs that run inside the guest, built on this machine once per source.

Busybox cannot make every system call a guest needs (`clock_settime` with nanoseconds, the
random driver's ioctls), so the few that matter are tiny C programs in images/. They are
built here with the system's C compiler, static (the guest has no libc), and cached in the
spool under the hash of their source, so a changed source builds a new binary and never
reuses an old one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmjobs.errors import VmjobsError
from vmjobs.image import recipe_bytes


def source_digest(source_name: str) -> str:
    """The first 16 hex digits of the SHA-256 of images/<source_name>."""
    return hashlib.sha256(recipe_bytes(source_name)).hexdigest()[:16]


def build_static(source_name: str, cache: Path, purpose: str, optimize: str = "-O2") -> Path:
    """`cache/<stem>-<digest>`: images/<source_name> compiled static, built if missing.

    Raises VmjobsError naming `purpose` when there is no C compiler or the build fails
    (a static build needs the C library's static archive: Debian's libc6-dev)."""
    source = recipe_bytes(source_name)
    stem = source_name.removesuffix(".c")
    target = cache / f"{stem}-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists():
        return target
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise VmjobsError(f"{purpose} needs a C compiler (apt-get install gcc libc6-dev) to "
                          f"build {stem}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / source_name
        src.write_bytes(source)
        out = Path(tmp) / stem
        proc = subprocess.run([compiler, "-static", optimize, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise VmjobsError(f"building {stem} for {purpose} failed: {last} "
                              "(a static build needs libc6-dev)")
        # a name of its own per builder: the daemon's launch threads build concurrently in
        # one process (two members of a gang starting at once), so a pid is not enough
        fd, name = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        staged = Path(name)
        try:
            shutil.copyfile(out, staged)
            staged.chmod(0o755)
            staged.rename(target)  # atomic: a concurrent builder finds a whole binary or none
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    return target
