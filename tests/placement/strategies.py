"""Hypothesis strategies: small random clusters and requests that exercise every filter."""

from __future__ import annotations

from hypothesis import strategies as st

from placement import Host, HostState, NumaPolicy, Request, ThreadPolicy
from placement.synthetic import make_host

PAGE = 2048


@st.composite
def hosts(draw: st.DrawFn, plain: bool = False) -> list[Host]:
    """Up to 4 small hosts; `plain` ones are all up, in one pool, without labels."""
    count = draw(st.integers(2 if plain else 1, 4))
    built = []
    for i in range(count):
        nodes = draw(st.integers(1, 3))
        cores = draw(st.integers(1, 4))
        threads = draw(st.integers(1, 2))
        total = nodes * cores * threads
        reserved = draw(st.frozensets(st.integers(0, total - 1), max_size=2))
        built.append(make_host(
            f"h{i}",
            nodes=nodes,
            cores=cores,
            threads=threads,
            memory_mib=draw(st.sampled_from([1024, 2048, 4096, 8192])),
            nics_per_node=draw(st.integers(0, 2)),
            hugepages=draw(st.sampled_from([(), ((PAGE, 512),)])),
            reserved_cpus=reserved,
            pools=("default",) if plain else draw(st.sampled_from(
                [("default",), ("ci",), ("ci", "default")])),
            labels=() if plain else draw(st.sampled_from([(), (("gpu", "yes"),)])),
            state=HostState.UP if plain else draw(st.sampled_from(
                [HostState.UP, HostState.UP, HostState.UP, HostState.CORDONED, HostState.DOWN])),
        ))
    return built


@st.composite
def plain_requests(draw: st.DrawFn) -> Request:
    """Requests with no host, pool or label constraint: what planners can make room for."""
    return Request(
        cpus=draw(st.integers(1, 4)),
        memory_mib=draw(st.integers(1, 2500)),
        nics=draw(st.sampled_from([0, 0, 0, 1])),
        numa=draw(st.sampled_from(list(NumaPolicy))),
        threads=draw(st.sampled_from([ThreadPolicy.DEDICATED, ThreadPolicy.DEDICATED,
                                      ThreadPolicy.ISOLATE])),
        anti_affinity=draw(st.sampled_from([None, None, None, "g"])),
        preemptible=draw(st.booleans()),
        priority=draw(st.integers(0, 2)),
    )


@st.composite
def requests(draw: st.DrawFn) -> Request:
    hugepages = draw(st.booleans()) and draw(st.booleans())
    memory = draw(st.integers(1, 3000))
    if hugepages:
        memory = max(2, memory - memory % 2)
    return Request(
        cpus=draw(st.integers(1, 5)),
        memory_mib=memory,
        nics=draw(st.sampled_from([0, 0, 0, 1, 2])),
        nic_vendor=draw(st.sampled_from([None, None, None, "0x8086", "15b3"])),
        numa=draw(st.sampled_from(list(NumaPolicy))),
        threads=draw(st.sampled_from([ThreadPolicy.DEDICATED, ThreadPolicy.DEDICATED,
                                      ThreadPolicy.ISOLATE])),
        hugepage_kib=PAGE if hugepages else None,
        host=draw(st.sampled_from([None] * 12 + ["h0", "h1", "nowhere"])),
        pool=draw(st.sampled_from([None] * 8 + ["ci"])),
        labels=draw(st.sampled_from([()] * 8 + [(("gpu", "yes"),)])),
        anti_affinity=draw(st.sampled_from([None, None, "g"])),
        preemptible=draw(st.booleans()),
    )


POLICY = st.sampled_from(["pack", "spread", "firstfit"])

# An operation: place a request under a policy (and reserve it when it fits), or release the
# n-th held job (modulo how many are held).
operations = st.lists(
    st.one_of(st.tuples(st.just("place"), requests(), POLICY),
              st.tuples(st.just("release"), st.integers(0, 50), st.none())),
    min_size=1,
    max_size=25,
)
