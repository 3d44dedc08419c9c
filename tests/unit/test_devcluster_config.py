"""The config `vmjob devcluster up` writes (no namespaces made: the writer alone)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmjobs import devcluster
from vmjobs.config import DEFAULT_SOCKET, load


def test_a_dev_clusters_config_has_a_daemon_socket_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Following docs/multihost.md (`eval "$(vmjob devcluster env)"`, then `vmjob serve`), a
    # daemon for the dev cluster took the machine's default socket: a second cluster's
    # daemon, or the machine's own, then refused to start or answered for the wrong hosts.
    monkeypatch.setattr(devcluster, "RUN_ROOT", tmp_path / "run")
    configs = [load(str(devcluster.write_config(
        devcluster.Layout(name, subnet, tmp_path / name), hosts=2, nics=1)))
        for name, subnet in (("a", "10.231.7.0/24"), ("b", "10.231.8.0/24"))]
    sockets = [config.socket for config in configs]
    assert sockets == [tmp_path / "run" / "a" / "vmjobs.sock",
                       tmp_path / "run" / "b" / "vmjobs.sock"]
    assert DEFAULT_SOCKET not in sockets
    assert [h.name for h in configs[0].hosts] == ["h1", "h2"]
