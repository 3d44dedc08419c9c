"""Usage accounting (vmjobs.usage): a scripted sequence of jobs whose load averages, core-hours
and waits are worked out by hand below, and the store query that feeds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement import Allocation, NodeShare, NumaPolicy, Request
from vmjobs import store as store_module
from vmjobs.jobs import JobRecord, JobState
from vmjobs.store import Store
from vmjobs.usage import Holding, JobHistory, Mark, load_rows, nearest_rank, user_rows

NOW = 1_000_000.0
DAY = 86400.0
S = JobState

# two hosts of 4 usable cores: a has two nodes of 2, b one node of 4
CAPACITY = {"a": {0: 2, 1: 2}, "b": {0: 4}}


def hold(host: str, **nodes: int) -> Holding:
    return Holding(host, tuple(sorted((int(k[1:]), v) for k, v in nodes.items())))


def history(job_id: str, owner: str, submitted: float,
            *marks: tuple[float, JobState, Holding | None]) -> JobHistory:
    return JobHistory(job_id, owner, submitted, tuple(Mark(t, s, h) for t, s, h in marks))


A0 = hold("a", n0=2)
# j1 (alice): submitted NOW-3600, placed and running on a/node0 with 2 cores at NOW-3000, ends
#   at NOW-1200 (30 min). Its end event still says "held" (a guest that powered itself off:
#   the cores are freed a second later without an event): the end must stop the count.
# j2 (alice): submitted NOW-90, runs on a/node1 with 1 core from NOW-30, still running.
# j3 (bob): a direct `vmjob run` (created = placed) on b with 4 cores, NOW-7200 .. NOW-3000.
# j4 (carol): queued at NOW-100, never placed: holds nothing, never waited to a start.
HISTORIES = [
    history("j1", "alice", NOW - 3600,
            (NOW - 3600, S.QUEUED, None), (NOW - 3000, S.PLACED, A0),
            (NOW - 3000, S.STARTING, A0), (NOW - 3000, S.RUNNING, A0),
            (NOW - 1200, S.COMPLETED, A0)),
    history("j2", "alice", NOW - 90,
            (NOW - 90, S.QUEUED, None), (NOW - 30, S.PLACED, hold("a", n1=1)),
            (NOW - 30, S.RUNNING, hold("a", n1=1))),
    history("j3", "bob", NOW - 7200,
            (NOW - 7200, S.PLACED, hold("b", n0=4)), (NOW - 7200, S.RUNNING, hold("b", n0=4)),
            (NOW - 3000, S.FAILED, None)),
    history("j4", "carol", NOW - 100, (NOW - 100, S.QUEUED, None)),
]


def test_load_average_per_host_worked_by_hand() -> None:
    rows = {r.host: r for r in load_rows(HISTORIES, CAPACITY, NOW, NOW - DAY)}
    a, b = rows["a"], rows["b"]
    assert (a.usable_cores, a.held_now, b.usable_cores, b.held_now) == (4, 1, 4, 0)
    # a, last minute: only j2, 1 core x 30 s of 4 cores x 60 s
    assert a.load["1m"] == pytest.approx(30 / 240)
    # a, last hour: j1 2 cores x 1800 s + j2 30 core-s, of 4 x 3600
    assert a.load["1h"] == pytest.approx(3630 / 14400)
    assert a.load["24h"] == pytest.approx(3630 / (4 * DAY))
    # b: j3 held 4 cores until NOW-3000: 600 s of the last hour, 4200 s of the day
    assert b.load["1m"] == 0.0
    assert b.load["1h"] == pytest.approx(4 * 600 / 14400)
    assert b.load["24h"] == pytest.approx(4 * 4200 / (4 * DAY))


def test_load_average_per_node() -> None:
    rows = {(r.host, r.node): r for r in load_rows(HISTORIES, CAPACITY, NOW, NOW - DAY,
                                                   by_node=True)}
    assert set(rows) == {("a", 0), ("a", 1), ("b", 0)}
    assert rows[("a", 0)].load["1h"] == pytest.approx(3600 / 7200)  # 2 of 2 cores, 30 min
    assert rows[("a", 0)].load["1m"] == 0.0
    assert rows[("a", 1)].load["1m"] == pytest.approx(30 / 120)
    assert rows[("a", 1)].held_now == 1
    assert rows[("b", 0)].load["1h"] == pytest.approx(1 / 6)


def test_windows_longer_than_since_and_unknown_hosts_are_none() -> None:
    rows = {r.host: r for r in load_rows(HISTORIES, {"a": {0: 2, 1: 2}}, NOW, NOW - 3600)}
    assert rows["a"].load["24h"] is None  # the events read do not reach back a day
    assert rows["a"].load["1h"] == pytest.approx(3630 / 14400)
    assert rows["b"].usable_cores is None  # held cores on a host that is down: no ratio
    assert rows["b"].load == {"1m": None, "1h": None, "24h": None}


def test_per_user_core_hours_and_waits_worked_by_hand() -> None:
    rows = {r.user: r for r in user_rows(HISTORIES, NOW, NOW - DAY)}
    assert set(rows) == {"alice", "bob"}  # carol's job never held anything nor started
    alice, bob = rows["alice"], rows["bob"]
    assert (alice.jobs, alice.started) == (2, 2)
    assert alice.core_hours == pytest.approx((2 * 1800 + 30) / 3600)
    assert alice.wait_mean_s == pytest.approx((600 + 60) / 2)
    assert alice.wait_p95_s == 600  # nearest rank of 2 values: ceil(1.9) = the 2nd
    assert bob.core_hours == pytest.approx(4 * 4200 / 3600)
    assert (bob.jobs, bob.started, bob.wait_mean_s, bob.wait_p95_s) == (1, 1, 0.0, 0.0)
    # over the last hour only: bob's 600 s of 4 cores; his start is before it (no wait)
    last_hour = {r.user: r for r in user_rows(HISTORIES, NOW, NOW - 3600)}
    assert last_hour["bob"].core_hours == pytest.approx(4 * 600 / 3600)
    assert (last_hour["bob"].started, last_hour["bob"].wait_mean_s) == (0, None)


def test_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert nearest_rank(values, 0.95) == 19.0
    assert nearest_rank([5.0], 0.95) == 5.0
    with pytest.raises(ValueError):
        nearest_rank([], 0.5)


def test_idle_siblings_count_on_the_first_node() -> None:
    data = {"host": "a", "cpus": [0, 1], "memory_mib": 256, "idle_cpus": [2, 3],
            "nodes": [{"node": 1, "cpus": [0], "memory_mib": 128},
                      {"node": 0, "cpus": [1], "memory_mib": 128}]}
    held = Holding.from_allocation(data)
    assert held.cpus == 4
    assert dict(held.cpus_by_node) == {1: 3, 0: 1}


# --- the store query: events written through the store's own API, on a scripted clock --------

class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _alloc(host: str, *cpus: int) -> Allocation:
    return Allocation(host=host, cpus=cpus, memory_mib=256,
                      nodes=(NodeShare(node=0, cpus=cpus, memory_mib=256),))


def _job(job_id: str, owner: str, state: JobState) -> JobRecord:
    return JobRecord(id=job_id, owner=owner, uid=1000, state=state, spec={"argv": ["true"]})


def test_store_histories_replay_what_was_held(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(NOW - 2 * DAY)
    monkeypatch.setattr(store_module.time, "time", clock)
    s = Store(tmp_path / "state.db")
    req = Request(cpus=2, memory_mib=256)
    # old: ran and ended two days ago -> outside any --since of a day
    s.add_job(_job("old", "alice", S.PLACED), req, _alloc("a", 0, 1), "run")
    s.transition("old", S.STARTING)
    clock.now += 60
    s.transition("old", S.COMPLETED, "done", release=True)
    # long: a direct run placed two days ago and still holding 2 cores (no event since)
    s.add_job(_job("long", "bob", S.PLACED), req, _alloc("b", 0, 1), "run")
    s.transition("long", S.STARTING)
    s.transition("long", S.RUNNING)
    # queued: submitted 1 h ago, placed 10 min later, ran 20 min, ended (freed)
    clock.now = NOW - 3600
    s.submit(_job("queued", "alice", S.QUEUED), req, "submitted")
    clock.now = NOW - 3000
    with s.reserving():
        s.assign("queued", _alloc("a", 2, 3), "placed")
    s.transition("queued", S.STARTING)
    s.transition("queued", S.RUNNING)
    clock.now = NOW - 1800
    s.transition("queued", S.COMPLETED, "exit 0", release=True)

    found = {h.job_id: h for h in s.usage_histories(NOW - DAY)}
    assert set(found) == {"long", "queued"}
    queued = found["queued"]
    assert [m.state for m in queued.marks] == [S.QUEUED, S.PLACED, S.STARTING, S.RUNNING,
                                                 S.COMPLETED]
    assert [m.held for m in queued.marks] == [None, hold("a", n0=2), hold("a", n0=2),
                                              hold("a", n0=2), None]
    assert queued.submitted == NOW - 3600
    rows = {r.host: r for r in load_rows(list(found.values()), {"a": {0: 4}, "b": {0: 4}},
                                         NOW, NOW - DAY)}
    assert rows["a"].load["1h"] == pytest.approx(2 * 1200 / (4 * 3600))
    assert rows["b"].load["24h"] == pytest.approx(2 / 4)  # held all day, 2 of 4 cores
    assert rows["b"].held_now == 2
    users = {r.user: r for r in user_rows(list(found.values()), NOW, NOW - DAY)}
    assert users["alice"].wait_mean_s == pytest.approx(600)
    assert users["bob"].core_hours == pytest.approx(2 * 24)
    # the time index serves the query
    plan = " ".join(str(r[3]) for r in s.db.execute(
        "EXPLAIN QUERY PLAN SELECT job_id FROM events WHERE time >= ?", (0,)))
    assert "events_time" in plan
    s.close()


def test_report_shows_a_non_admin_only_their_own_user_row() -> None:
    from vmjobs.usage import report

    everyone = report(HISTORIES, CAPACITY, NOW, NOW - DAY, "user")
    assert [r["user"] for r in everyone["rows"]] == ["alice", "bob"]
    own = report(HISTORIES, CAPACITY, NOW, NOW - DAY, "user", user="bob")
    assert [r["user"] for r in own["rows"]] == ["bob"]
    hosts = report(HISTORIES, CAPACITY, NOW, NOW - DAY, "host", user="bob")
    assert [r["host"] for r in hosts["rows"]] == ["a", "b"]  # aggregates are for everyone
    assert hosts["windows"] == {"1m": 60.0, "1h": 3600.0, "24h": 86400.0}
    with pytest.raises(ValueError):
        report(HISTORIES, CAPACITY, NOW, NOW - DAY, "rack")


# --- by pool and by profile: a second scripted sequence, with whole allocations ------------------
#
# Hosts as CAPACITY: a has two NUMA nodes of 2 cores (cpus 0,1 | 2,3), b one node of 4 (0-3).
# Pools: a in "lab"; b in "lab" and "ci" (counted in both).
# p1 (profile pair): a/node0, cpus 0,1, from NOW-3000, still running
# p4 (no profile):   a/node1, cpus 2,3, NOW-2400 .. NOW-300 (COMPLETED)
# p3 (no profile):   b, cpus 2,3, from NOW-900, still running
# p2 (profile pair): b, cpus 0,1, from NOW-600, still running
# Profile "pair" (2 cores on one node) cannot start while a/node0, a/node1 and b are all
# taken: only in [NOW-600, NOW-300]. Profile "wide" (4 cores on one node) fits only b, which
# is busy from NOW-900 on.

def _held(host: str, node: int, *cpus: int) -> Holding:
    from vmjobs.codec import allocation_to_dict

    return Holding.from_allocation(allocation_to_dict(Allocation(
        host=host, cpus=cpus, memory_mib=256,
        nodes=(NodeShare(node=node, cpus=cpus, memory_mib=256),))))


def _ran(job_id: str, start: float, end: float | None, held: Holding,
         profile: str | None = None) -> JobHistory:
    marks = [Mark(start, S.PLACED, held), Mark(start, S.RUNNING, held)]
    if end is not None:
        marks.append(Mark(end, S.COMPLETED, None))
    return JobHistory(job_id, "alice", start, tuple(marks), profile)


LAB = [
    _ran("p1", NOW - 3000, None, _held("a", 0, 0, 1), "pair"),
    _ran("p4", NOW - 2400, NOW - 300, _held("a", 1, 2, 3)),
    _ran("p3", NOW - 900, None, _held("b", 0, 2, 3)),
    _ran("p2", NOW - 600, None, _held("b", 0, 0, 1), "pair"),
]
POOLS = {"a": ("lab",), "b": ("lab", "ci")}


def _lab_hosts() -> list:
    from placement import make_host

    return [make_host("a", nodes=2, cores=2, memory_mib=4096),
            make_host("b", nodes=1, cores=4, memory_mib=8192)]


def test_load_average_per_pool_worked_by_hand() -> None:
    from vmjobs.usage import pool_rows

    rows = {r.name: r for r in pool_rows(LAB, CAPACITY, POOLS, NOW, NOW - DAY)}
    ci, lab = rows["ci"], rows["lab"]
    assert (ci.hosts, ci.usable_cores, ci.held_now, ci.jobs) == (("b",), 4, 4, 2)
    assert ci.load["1m"] == pytest.approx(1.0)  # b fully held the whole last minute
    assert ci.load["1h"] == pytest.approx((2 * 900 + 2 * 600) / (4 * 3600))
    assert (lab.hosts, lab.usable_cores, lab.held_now, lab.jobs) == (("a", "b"), 8, 6, 4)
    # p1 2x3000 + p4 2x2100 + p3 2x900 + p2 2x600 core-s of 8 cores x 1 h
    assert lab.load["1h"] == pytest.approx(13200 / (8 * 3600))
    assert lab.load["24h"] == pytest.approx(13200 / (8 * DAY))
    # a member that is down: the pool's capacity is unknown, not smaller
    partial = {r.name: r for r in pool_rows(LAB, {"a": {0: 2, 1: 2}}, POOLS, NOW, NOW - DAY)}
    assert partial["lab"].usable_cores is None and partial["lab"].load["1h"] is None


def test_profile_rows_and_could_start_worked_by_hand() -> None:
    from vmjobs.usage import profile_rows

    pair = Request(cpus=2, memory_mib=256, numa=NumaPolicy.STRICT)
    wide = Request(cpus=4, memory_mib=256, numa=NumaPolicy.STRICT)
    rows = {r.name: r for r in profile_rows(LAB, _lab_hosts(), {"pair": pair, "wide": wide},
                                            NOW, NOW - DAY)}
    p = rows["pair"]
    assert (p.hosts, p.usable_cores, p.held_now, p.jobs) == (("a", "b"), 8, 4, 2)
    assert p.load["1m"] == pytest.approx((2 * 60 + 2 * 60) / (8 * 60))
    assert p.load["1h"] == pytest.approx((2 * 3000 + 2 * 600) / (8 * 3600))
    # no room for a pair only in [NOW-600, NOW-300]
    assert p.could_start == pytest.approx({"1m": 1.0, "1h": 3300 / 3600,
                                           "24h": (DAY - 300) / DAY})
    w = rows["wide"]
    assert (w.hosts, w.usable_cores, w.held_now, w.jobs) == (("b",), 4, 0, 0)
    assert w.load == {"1m": 0.0, "1h": 0.0, "24h": 0.0}
    assert w.could_start == pytest.approx({"1m": 0.0, "1h": 2700 / 3600,
                                           "24h": (DAY - 900) / DAY})
    # over the last hour only: the 24 h window is unknown
    hour = {r.name: r for r in profile_rows(LAB, _lab_hosts(), {"pair": pair}, NOW,
                                            NOW - 3600)}
    assert hour["pair"].could_start == pytest.approx({"1m": 1.0, "1h": 3300 / 3600,
                                                      "24h": None})
    # a profile the history names but the config no longer has: a row without figures
    gone = {r.name: r for r in profile_rows(LAB, _lab_hosts(), {}, NOW, NOW - DAY)}
    assert gone["pair"].usable_cores is None and gone["pair"].could_start is None


def test_report_by_pool_and_profile_shapes() -> None:
    from vmjobs.usage import report

    pools = report(LAB, CAPACITY, NOW, NOW - DAY, "pool", pools=POOLS)
    assert [(r["pool"], r["hosts"], r["held_now"]) for r in pools["rows"]] == [
        ("ci", ["b"], 4), ("lab", ["a", "b"], 6)]
    pair = Request(cpus=2, memory_mib=256, numa=NumaPolicy.STRICT)
    profiles = report(LAB, CAPACITY, NOW, NOW - DAY, "profile", hosts=_lab_hosts(),
                      profiles={"pair": pair})
    (row,) = profiles["rows"]
    assert row["profile"] == "pair" and row["could_start"]["1h"] == pytest.approx(11 / 12)


def test_store_histories_carry_the_profile_and_whole_allocation(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    record = JobRecord(id="pj", owner="alice", uid=1000, state=S.PLACED,
                       spec={"argv": ["true"], "profile": "pair"})
    s.add_job(record, Request(cpus=2, memory_mib=256), _alloc("a", 0, 1), "run")
    s.add_job(_job("plain", "bob", S.PLACED), Request(cpus=1, memory_mib=256),
              _alloc("a", 2), "run")
    found = {h.job_id: h for h in s.usage_histories(0)}
    assert (found["pj"].profile, found["plain"].profile) == ("pair", None)
    assert found["pj"].marks[0].held.allocation == _alloc("a", 0, 1)
    s.close()
