"""`GET /v1/pools` on the daemon's own state: members, holders of every kind, each pool's
line. The daemon runs in-process on libvirt's test driver (`test:///default`: one host `a` of
16 cpus, here in pools ci and lab); passes are made one at a time by the test and no guest is
launched, so nothing depends on a timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from placement import Request
from vmjobs.config import parse
from vmjobs.daemon import scheduler
from vmjobs.daemon.api import Api
from vmjobs.daemon.core import Daemon
from vmjobs.daemon.identity import Caller
from vmjobs.daemon.server import ApiError, ApiRequest
from vmjobs.jobs import JobRecord, JobState
from vmjobs.virt.events import start_event_loop


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    start_event_loop()
    config = parse({"spool": str(tmp_path / "spool"), "virt_type": "qemu",
                    "nic_backend": "emulated",
                    "hosts": [{"name": "a", "uri": "test:///default", "pool": ["lab", "ci"]}]},
                   "test")
    made = Daemon(config)
    made.hosts.connect_all()
    assert made.hosts.is_up("a")
    # only the passes are under test: no launch threads (they would fail on the test driver)
    monkeypatch.setattr(made, "spawn", lambda *args, **kwargs: None)
    yield made
    made.shutdown()


def submit(d: Daemon, job_id: str, cpus: int, pool: str | None = None,
           **spec: Any) -> None:
    record = JobRecord(id=job_id, owner="alice", uid=1000, state=JobState.QUEUED,
                       spec={"argv": ["true"], "image": "none", **spec})
    with d.lock:
        d.store.submit(record, Request(cpus=cpus, memory_mib=128, pool=pool), "test")


def get(d: Daemon, name: str | None = None) -> Any:
    params = {"name": name} if name is not None else {}
    request = ApiRequest("GET", "/v1/pools", {}, params, Caller(1001, "bob", False), None,
                         None)  # type: ignore[arg-type]
    return Api(d).pools(request).body


def test_pools_show_members_holders_of_every_kind_and_each_line(daemon: Daemon) -> None:
    before = time.time()
    submit(daemon, "fill", 14, "ci", time_limit=600)
    with daemon.lock:
        scheduler.one_pass(daemon)
        # another kind of row holding cpus (a held reservation), written straight to the
        # store as its own code would: it shows up because the store says it holds cores
        cluster = daemon.live.cluster()
        alloc = cluster.place(Request(cpus=1, memory_mib=128)).allocation
        assert alloc is not None
        daemon.store.add_job(JobRecord(id="r1", owner="carol", uid=1002, state=JobState.PLACED,
                                       spec={"kind": "reservation"}),
                             Request(cpus=1, memory_mib=128), alloc, "held")
    submit(daemon, "w1", 2, "ci")
    submit(daemon, "w2", 2, "lab")
    submit(daemon, "w3", 2, "ci")
    with daemon.lock:
        scheduler.one_pass(daemon)
    views = get(daemon)
    assert [v["name"] for v in views] == ["ci", "lab"]
    ci = views[0]
    assert [m["host"] for m in ci["members"]] == ["a"]
    member = ci["members"][0]
    assert member["cpus_total"] == 16 and member["cpus_free"] == 1  # 14 + 1 held
    assert (ci["cpus_free"], ci["cpus_total"]) == (1, 16)
    holders = {h["id"]: h for h in ci["holders"]}
    assert set(holders) == {"fill", "r1"}
    assert holders["fill"]["kind"] == "job" and holders["fill"]["owner"] == "alice"
    assert holders["fill"]["cpus"] == 14 and holders["fill"]["host"] == "a"
    assert before <= holders["fill"]["since"] <= time.time()
    assert holders["fill"]["until"] == pytest.approx(holders["fill"]["since"] + 600)
    assert holders["r1"]["kind"] == "reservation" and holders["r1"]["until"] is None
    # a host in two pools: the same holders in both
    assert {h["id"] for h in views[1]["holders"]} == {"fill", "r1"}
    assert [(q["id"], q["position"]) for q in ci["queue"]] == [("w1", 1), ("w3", 2)]
    assert ci["queue"][0]["waiting_because"].startswith("first in line for pool ci: ")
    assert [(q["id"], q["position"]) for q in views[1]["queue"]] == [("w2", 1)]
    assert views[1]["queue"][0]["waiting_because"].startswith("first in line for pool lab: ")
    assert get(daemon, "lab") == views[1]
    hosts = Api(daemon).hosts(None).body  # type: ignore[arg-type]
    assert [(h["name"], h["pools"]) for h in hosts] == [("a", ["ci", "lab"])]


def test_an_unknown_pool_is_a_404_naming_the_pools(daemon: Daemon) -> None:
    with pytest.raises(ApiError) as info:
        get(daemon, "nope")
    assert info.value.status == 404
    assert str(info.value) == "no pool 'nope' (pools: ci, lab)"
