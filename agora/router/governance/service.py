"""The operations behind both the ``agora keys / tenants / usage / audit`` commands and the
``/admin/`` API, written once: each takes plain values (a CLI's flags or a JSON body) and
returns JSON-ready dicts; a bad value is a ``ValueError`` naming it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from agora.router.governance.keys import check_tenant, create_key, parse_duration
from agora.router.governance.limits import key_subject, tenant_subject, window_of
from agora.router.governance.store import LIMIT_FIELDS, Limits, Store

KEY_FIELDS = ("tenant", "role", "rpm", "tpm", "max_parallel", "budget_tokens", "budget_window", "models", "expires",
              "priority", "session_requests", "session_tokens")  # fmt: skip
TENANT_FIELDS = ("weight", "rpm", "tpm", "max_parallel", "budget_tokens", "budget_window", "session_requests",
                 "session_tokens")  # fmt: skip


def _limits(values: dict[str, Any]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in LIMIT_FIELDS:
        if name == "budget_window_s":
            continue
        v = values.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number of at least 1")
        out[name] = v
    if values.get("budget_window") is not None:
        out["budget_window_s"] = parse_duration(values["budget_window"], "budget_window")
    return out


def new_key(store: Store, values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(KEY_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; known: {', '.join(KEY_FIELDS)}")
    if not isinstance(values.get("tenant"), str):
        raise ValueError("tenant is required (a name)")
    models = values.get("models")
    if isinstance(models, str):
        models = models.split(",")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ValueError("models must be a list of model names (or a comma-separated string)")
    key, record = create_key(store, values["tenant"], values.get("role") or "user", Limits(**_limits(values)),
                             models, values.get("priority") or "interactive", values.get("expires"))  # fmt: skip
    return {"key": key, **record.public()}


def set_tenant(store: Store, name: str, values: dict[str, Any]) -> dict[str, Any]:
    check_tenant(name)
    unknown = sorted(set(values) - set(TENANT_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; known: {', '.join(TENANT_FIELDS)}")
    weight = values.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0):
        raise ValueError("weight must be a positive number")
    t = store.set_tenant(name, weight, **_limits(values))
    return tenant_dict(t)


def tenant_dict(t: Any) -> dict[str, Any]:
    return {"name": t.name, "weight": t.weight, "limits": {k: v for k, v in t.limits.__dict__.items() if v is not None},
            "created": t.created}  # fmt: skip


def usage(store: Store, tenant: str | None = None) -> list[dict[str, Any]]:
    """Per tenant: requests, tokens in and out, blocked (all time, from the audit), budget left now."""
    rows = {r["tenant"]: r for r in store.usage_report(tenant)}
    tenants = {t.name: t for t in store.tenants()}
    if tenant is not None:
        names = [tenant] if tenant in rows or tenant in tenants else []
    else:
        names = sorted(set(rows) | set(tenants))
    now = time.time()
    out = []
    for name in names:
        row = rows.get(name) or {"tenant": name, "requests": 0, "tokens_in": 0, "tokens_out": 0, "blocked": 0}
        t = tenants.get(name)
        left = None
        window = window_of(t.limits, tenant_subject(name), now) if t is not None else None
        if window is not None and t is not None and t.limits.budget_tokens is not None:
            used = store.usage_of([window]).get(window, 0)
            left = max(0, t.limits.budget_tokens - used)
        keys_left = []
        for k in store.keys(name, include_revoked=False):
            w = window_of(k.limits, key_subject(k.id), now)
            if w is not None and k.limits.budget_tokens is not None:
                keys_left.append({"id": k.id, "budget_left": max(0, k.limits.budget_tokens -
                                                                 store.usage_of([w]).get(w, 0))})  # fmt: skip
        out.append({**row, "budget_left": left, "keys": keys_left})
    return out


def parse_time(text: str | None, what: str = "since") -> float | None:
    """An ISO 8601 time (UTC unless it says), a duration back from now ('1h', '7d'), or epoch seconds."""
    if text is None or text == "":
        return None
    text = str(text).strip()
    try:
        return time.time() - parse_duration(text, what)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {text!r}: an ISO time (2026-12-01T08:00), a duration back (1h, 7d) or epoch "
                         "seconds") from None  # fmt: skip
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
