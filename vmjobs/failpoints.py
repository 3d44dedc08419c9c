"""Named points where a test makes this process die, to prove that nothing is lost there.

`VMJOBS_FAILPOINTS=migrate:landed` (comma-separated names) in the environment of `vmjob serve`
makes the process SIGKILL itself the first time it reaches that point: a real `kill -9` at an
exact instant of a move, which a test cannot hit from outside (the idea of FreeBSD's fail(9)
and etcd's gofail, reduced to the one action we need). Unset, `hit` is a set lookup.

The points, in the order a move passes them:

- `migrate:reserved`  the destination is reserved (placeholder) and the job MIGRATING
- `migrate:copying`   migrate3 is copying memory (first progress report)
- `migrate:landed`    migrate3 returned: the guest runs on the destination, the store still
                      says source
- `checkpoint:saving` the save to the spool is under way
- `checkpoint:saved`  the save finished (guest gone, file complete), the store says
                      CHECKPOINTING
- `restore:placed`    the job holds its new reservation, the guest is not restored yet
- `restore:restored`  the guest runs again, the store says RESTORING and the file is there
"""

from __future__ import annotations

import os
import signal

ENV = "VMJOBS_FAILPOINTS"
_ARMED = frozenset(name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip())


def hit(name: str) -> None:
    """Die at once (SIGKILL, no cleanup of any kind) if `name` is armed."""
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
