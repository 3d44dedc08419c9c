"""Hypothesis profiles for every property test in the suite.

- "ci" (loaded when the environment variable CI is set, as CI runs do): the same examples on
  every run (`derandomize`: the seed is derived from each test's code), no example database
  carried between runs, no per-example deadline and no slowness health check (a loaded 2-core
  machine must not fail a test by its timing), and a reproduction blob for any failure.
- "dev" (the default): random examples, as Hypothesis does by default, with failures kept in
  the local example database and replayed first on the next run; no deadline.
- "explore" (`HYPOTHESIS_PROFILE=explore`): fresh random seeds like "dev", and 1,000 examples
  for every property test that does not fix its own count, to look for new counterexamples
  outside CI (README.md says how to run it).

`HYPOTHESIS_PROFILE=NAME` picks a profile explicitly, e.g. `HYPOTHESIS_PROFILE=ci` reproduces
a CI run locally. A test's own `@settings(max_examples=...)` keeps its count under every
profile; every setting it does not give comes from the profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Every profile starts from Hypothesis' own defaults, not from whatever profile Hypothesis
# itself loaded at import (recent versions load a built-in "ci" one when CI is set).
DEFAULT = settings.get_profile("default")
settings.register_profile("dev", DEFAULT, deadline=None, print_blob=True)
settings.register_profile(
    "ci",
    DEFAULT,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    DEFAULT,
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def chosen_profile(environ: os._Environ[str] | dict[str, str]) -> str:
    """HYPOTHESIS_PROFILE if set, else "ci" when CI is set to anything but "" / "0" /
    "false", else "dev"."""
    named = environ.get("HYPOTHESIS_PROFILE", "")
    if named:
        return named
    return "ci" if environ.get("CI", "").lower() not in ("", "0", "false") else "dev"


settings.load_profile(chosen_profile(os.environ))
