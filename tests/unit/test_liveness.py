"""The liveness probe's state machine (`vmjobs.daemon.liveness`): pure transitions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmjobs.daemon.liveness import Health, Probe, answered, failed, sent, waited


def test_a_round_trip_answered_leaves_the_host_answering() -> None:
    probe = sent(Probe(), now=100.0)
    assert probe == Probe(Health.WAITING, 100.0)
    assert answered(probe) == Probe()


def test_an_unanswered_round_trip_is_unreachable_exactly_at_its_timeout() -> None:
    probe = sent(Probe(), now=100.0)
    assert waited(probe, now=109.99, timeout_s=10.0) == probe
    late = waited(probe, now=110.0, timeout_s=10.0)
    assert late.health is Health.UNREACHABLE
    assert late.why == "libvirtd did not answer a probe within 10s"


def test_a_round_trip_on_a_dead_connection_is_unreachable_at_once() -> None:
    dead = failed(sent(Probe(), now=5.0), "probe failed: client socket is closed")
    assert dead.health is Health.UNREACHABLE
    assert dead.why == "probe failed: client socket is closed"


@pytest.mark.parametrize("step", [
    lambda p: answered(p), lambda p: failed(p, "x"), lambda p: waited(p, 1.0, 1.0)])
def test_only_a_sent_probe_can_be_answered_fail_or_time_out(
        step: Callable[[Probe], Probe]) -> None:
    with pytest.raises(ValueError, match="a probe that is answering"):
        step(Probe())


def test_a_probe_is_sent_once_at_a_time_and_unreachable_is_final() -> None:
    waiting = sent(Probe(), now=0.0)
    with pytest.raises(ValueError, match="cannot send a probe that is waiting"):
        sent(waiting, now=1.0)
    dead = waited(waiting, now=30.0, timeout_s=10.0)
    for step in (lambda p: sent(p, 31.0), answered, lambda p: waited(p, 40.0, 10.0)):
        with pytest.raises(ValueError, match="unreachable"):
            step(dead)
