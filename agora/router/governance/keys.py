"""Virtual API keys: made here, shown once, kept only as a hash.

A key is ``agk-`` + 43 URL-safe characters (256 random bits); its id (``key_`` + 12 hex
characters) is what listings, the audit and the metrics name. The gateway holds the
hashes of the live keys in memory, so checking a key is one SHA-256 and one dict
lookup, whatever a flood of wrong keys does.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence

from agora.router.governance.store import BANDS, ROLES, KeyRecord, Limits, Store

KEY_PREFIX = "agk-"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def new_key() -> tuple[str, str]:
    """(key, key id)."""
    return KEY_PREFIX + secrets.token_urlsafe(32), "key_" + secrets.token_hex(6)


def hash_key(credential: str | bytes) -> str:
    raw = credential if isinstance(credential, bytes) else credential.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def parse_duration(text: str | int | float, what: str = "duration") -> int:
    """'30d', '1h', '90m', '45s', '2w' (or a number of seconds) -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"{what} {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 45s")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{what} must be positive")
    return int(seconds)


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not _TENANT.match(name):
        raise ValueError(f"tenant {name!r}: 1-128 characters of letters, digits and . _ : @ -, "
                         "starting with a letter or digit")  # fmt: skip
    return name


def create_key(store: Store, tenant: str, role: str = "user", limits: Limits | None = None,
               models: Sequence[str] | None = None, priority: str = "interactive",
               expires_in: str | int | None = None) -> tuple[str, KeyRecord]:  # fmt: skip
    """Make a key; the key itself is returned here and never again."""
    check_tenant(tenant)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    if priority not in BANDS:
        raise ValueError(f"priority {priority!r}: one of {', '.join(BANDS)}")
    limits = limits or Limits()
    for name, value in limits.__dict__.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1")
    if (limits.budget_tokens is None) != (limits.budget_window_s is None):
        raise ValueError("give --budget-tokens and --budget-window together")
    if models is not None:
        models = [m.strip() for m in models if m.strip()]
        if not models:
            raise ValueError("--models: name at least one model (or leave it out for every model)")
    expires = time.time() + parse_duration(expires_in, "expires") if expires_in is not None else None
    key, key_id = new_key()
    record = store.create_key(key_id, hash_key(key), tenant, role, limits, models, priority, expires)
    return key, record
