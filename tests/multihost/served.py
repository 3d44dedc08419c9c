"""One daemon on the dev cluster for a whole test module, each test still starting from an idle
daemon: the per-test fixture starts it again if the test before left it down (a test that
killed it and failed before starting it), and after each test destroys and reports any guest
of the daemon's jobs still there — what the per-test daemon of test_moves_daemon.py checked
at its teardown — so one test's leftovers fail that test, never the next one.

Use in a module (`daemon` is then what the tests take, as before):

    served = module_daemon("gangs")
    daemon = each_test()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from tests.daemon.conftest import Daemon
from tests.multihost.conftest import Cluster
from tests.multihost.test_moves_daemon import _domains, _make_daemon
from vmjobs.jobs import JobState

# cancelled after a test that failed with jobs still going, so the next test finds it idle
UNENDED = tuple(s.value for s in JobState if not s.finished)


def module_daemon(name: str, config: Callable[[Cluster], dict[str, Any]] | None = None
                  ) -> Callable[..., Iterator[Daemon]]:
    """A module-scoped fixture: the daemon `name` on the cluster, `config(cluster)` merged
    into its config (as `_make_daemon` does), started once, stopped at the module's end."""

    @pytest.fixture(scope="module", name="served")
    def served(cluster: Cluster) -> Iterator[Daemon]:
        made = _make_daemon(cluster, name, **(config(cluster) if config else {}))
        made.start()
        try:
            yield made
        finally:
            made.stop()
            _destroy_left(cluster, made)

    return served


def each_test() -> Callable[..., Iterator[Daemon]]:
    """The per-test fixture over the module's `served`: running at the start, no guest of
    its jobs left at the end (checked, then destroyed, as the per-test daemon's teardown
    did)."""

    @pytest.fixture(name="daemon")
    def daemon(cluster: Cluster, served: Daemon) -> Iterator[Daemon]:
        made = served
        if made.proc is None or made.proc.poll() is not None:
            made.proc = None
            made.start()
        yield made
        if made.proc is None:  # killed and not started again: start it to tidy up
            made.start()
        for row in made.query("SELECT id, state FROM jobs"):
            if row["state"] in UNENDED:
                made.vmjob("cancel", row["id"])
        _destroy_left(cluster, made)

    return daemon


def _destroy_left(cluster: Cluster, made: Daemon, timeout: float = 60) -> None:
    """A guest whose job has ended goes a moment later (libvirt reaps QEMU ~2 s after the
    power-off here): wait for that, bounded; what is still there then was left behind."""
    ids = [r["id"] for r in made.query("SELECT id FROM jobs")]
    deadline = time.monotonic() + timeout
    while (left := _domains(cluster, ids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for host, domain in left:  # never left behind for the next test
        conn = libvirt.open(cluster.layout.uri(int(host[1:])))
        try:
            conn.lookupByName(domain).destroy()
        except libvirt.libvirtError:
            pass  # it went by itself meanwhile
        finally:
            conn.close()
    assert not left, f"domains left behind: {left}"
