"""Hosts bucketed by free cpus, so a search skips hosts that cannot have room.

A host sits in exactly one bucket per index: the number of free cpus on its emptiest-node
(`by_node`) or on the whole host (`by_host`). A request for N vCPUs only needs to look at
buckets >= N: a host in a lower bucket fails the cpu filter whatever else it has. Hosts that are
not up are in no bucket.
"""

from __future__ import annotations

from collections.abc import Iterator


class Buckets:
    """Host ids by an integer key; keeps the invariant one bucket per indexed host."""

    def __init__(self, size: int, hosts: int) -> None:
        self._buckets: list[set[int]] = [set() for _ in range(size + 1)]
        self._key: list[int | None] = [None] * hosts

    def copy(self) -> Buckets:
        clone = Buckets.__new__(Buckets)
        clone._buckets = [set(b) for b in self._buckets]
        clone._key = list(self._key)
        return clone

    def put(self, host: int, key: int | None) -> None:
        """Move `host` to bucket `key`; None takes it out of the index."""
        old = self._key[host]
        if old == key:
            return
        if old is not None:
            self._buckets[old].discard(host)
        if key is not None:
            self._buckets[key].add(host)
        self._key[host] = key

    def ascending(self, at_least: int) -> Iterator[int]:
        """Hosts with key >= at_least, smallest key first, host id order within a key."""
        for bucket in self._buckets[max(at_least, 0):]:
            if bucket:
                yield from sorted(bucket)

    def descending(self, at_least: int) -> Iterator[int]:
        for bucket in reversed(self._buckets[max(at_least, 0):]):
            if bucket:
                yield from sorted(bucket)

    def at_least(self, at_least: int) -> list[int]:
        return sorted(h for bucket in self._buckets[max(at_least, 0):] for h in bucket)
