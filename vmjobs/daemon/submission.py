"""A submission as the API receives it: the body of `POST /v1/jobs` is a job spec in its
canonical JSON form (`vmjobs.spec`), checked field by field, each refusal one line (400).

The body is the client's word only about *what* to run; who submits comes from the socket.
`input` is an upload token (`POST /v1/uploads`), `output` where the submitter wants /job/out
(only clients use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmjobs.spec import Profile, Spec
from vmjobs.spec import parse as parse_spec


def parse(body: dict[str, Any], profiles: Mapping[str, Profile] | None = None) -> Spec:
    """The spec, with its `profile` (if any) applied from `profiles` (the daemon's config):
    fields the body leaves unset or null take the profile's values. Raises SpecError (a usage
    error: 400 at the API) on the first bad field or an unknown profile."""
    return parse_spec(body, profiles=profiles if profiles is not None else {})
