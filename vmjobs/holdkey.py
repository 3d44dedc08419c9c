"""A held reservation's key: what a CI pipeline hands its later steps so that they, and only
they, may run jobs inside the reservation (`vmjob reserve --key K`, `run --reservation R --key
K`).

Only a salted hash is stored: scrypt (RFC 7914; `hashlib.scrypt`, OpenSSL's) with n=2**14,
r=8, p=1 — the parameters RFC 7914 and the Python docs give for interactive logins, ~16 MiB
and ~50 ms a check — so a copy of the store does not give the keys away, and a comparison
takes constant time (`hmac.compare_digest`). Stored as `scrypt$n$r$p$SALT$HASH` (hex), so
the parameters can grow without breaking stored keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from vmjobs.errors import VmjobsError

EXIT_BAD_KEY = 77  # EX_NOPERM (sysexits.h): a wrong or missing key, distinct from every other
BAD_KEY = "bad_key"  # the refusal's JSON `code`
MAX_KEY_CHARS = 1024  # longer keys are refused (scrypt's cost does not depend on it, storage does)
_N, _R, _P = 2**14, 8, 1
_SALT_BYTES = 16
_HASH_BYTES = 32


class BadKey(VmjobsError):
    """A wrong or missing key for a reservation that has one."""

    exit_code = EXIT_BAD_KEY
    json_code = BAD_KEY


def check_key_text(key: object) -> str:
    """A key as given: a non-empty string of printable characters, at most MAX_KEY_CHARS.
    Raises VmjobsError (a usage error at the API) naming what is wrong, never the key."""
    if not isinstance(key, str) or not key:
        raise VmjobsError("a reservation key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise VmjobsError(f"a reservation key must be at most {MAX_KEY_CHARS} characters")
    if not key.isprintable():
        raise VmjobsError("a reservation key must be printable text (no control characters)")
    return key


def hash_key(key: str, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$SALT$HASH` for `key` (a fresh random salt unless given)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(key.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_HASH_BYTES)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def key_matches(key: str | None, stored: str | None) -> bool:
    """Whether `key` opens a reservation whose stored hash is `stored`. A reservation made
    without a key (`stored` None) is opened by no key at all, and only by that: a key given
    for it is a mistake worth refusing too (the caller may have the wrong reservation)."""
    if stored is None:
        return key is None
    if key is None:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(digest)
        found = hashlib.scrypt(key.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                               p=int(p), dklen=len(expected))
    except ValueError:  # a damaged stored hash opens nothing
        return False
    return hmac.compare_digest(found, expected)


def refusal(reservation_id: str, key: str | None, stored: str | None) -> str:
    """The one line for a key that does not open the reservation (never echoing any key)."""
    if stored is None:
        return (f"reservation {reservation_id} has no key: give no --key for it")
    if key is None:
        return f"reservation {reservation_id} needs its key: give --key (or $VMJOB_KEY)"
    return f"wrong key for reservation {reservation_id}"
