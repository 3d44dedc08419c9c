"""The Hypothesis profiles of tests/conftest.py: CI runs are derandomized, others are not."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import chosen_profile


@pytest.mark.parametrize("environ, profile", [
    ({"CI": "true"}, "ci"),
    ({"CI": "1"}, "ci"),
    ({}, "dev"),
    ({"CI": ""}, "dev"),
    ({"CI": "false"}, "dev"),
    ({"CI": "true", "HYPOTHESIS_PROFILE": "explore"}, "explore"),
    ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
])
def test_profile_chosen_from_the_environment(environ: dict[str, str], profile: str) -> None:
    assert chosen_profile(environ) == profile


def test_ci_runs_the_same_examples_without_timing_checks() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None and ci.print_blob
    assert HealthCheck.too_slow in ci.suppress_health_check


def test_other_profiles_draw_random_examples() -> None:
    # Hypothesis loads its own "ci" profile when CI is set; ours must not inherit from it.
    for name in ("dev", "explore"):
        profile = settings.get_profile(name)
        assert not profile.derandomize and profile.database is not None, name
        assert profile.deadline is None, name
    assert settings.get_profile("explore").max_examples > settings.get_profile("dev").max_examples
