"""The gateway's admin API under ``/admin/`` (an admin key, or on a gateway with no keys at all, a
client on this machine): the same operations as ``agora keys / tenants / usage / audit``.

::

    GET    /admin/keys[?tenant=T]           list (never a key, never its hash)
    POST   /admin/keys        {tenant, role, rpm, tpm, max_parallel, budget_tokens, budget_window, models,
                               expires, priority, session_requests, session_tokens}  -> 201 {key, id, ...}
    DELETE /admin/keys/{id}                 revoke (every gateway on the store within a second)
    GET    /admin/tenants;  PUT /admin/tenants/{name}  {weight, rpm, tpm, max_parallel, budget_tokens, ...}
    GET    /admin/usage[?tenant=T]
    GET    /admin/audit?after=SEQ&limit=N[&since=..&until=..&tenant=T]   one page, oldest first
    GET    /admin/audit/verify
    POST   /admin/reload                    the semantic config, re-read
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from agora.openai.common import json_object
from agora.openai.errors import APIError
from agora.router.governance import audit, service

if TYPE_CHECKING:
    from agora.router.gateway import Gateway

_MAX_PAGE = 1000


async def handle(gw: Gateway, method: str, path: str, query: bytes, body: bytes) -> tuple[int, Any, dict[str, str]]:
    store = gw.governance.store
    if store is None:
        raise APIError(503, "the governance store is not open", "service_unavailable")
    q = {k: v[-1] for k, v in parse_qs(query.decode("latin-1")).items()}
    parts = [unquote(p) for p in path.removeprefix("/admin/").split("/")]
    try:
        if parts == ["keys"] and method == "GET":
            keys = await asyncio.to_thread(store.keys, q.get("tenant"))
            return 200, {"object": "list", "data": [k.public() for k in keys]}, {}
        if parts == ["keys"] and method == "POST":
            made = await asyncio.to_thread(service.new_key, store, _json(body))
            await gw.governance.sync()
            return 201, made, {"cache-control": "no-store"}
        if len(parts) == 2 and parts[0] == "keys" and method == "DELETE":
            if not await asyncio.to_thread(store.revoke_key, parts[1]):
                raise APIError(404, f"no live key {parts[1]!r}", "not_found_error", code="key_not_found")
            await gw.governance.sync()
            return 200, {"id": parts[1], "revoked": True}, {}
        if parts == ["tenants"] and method == "GET":
            tenants = await asyncio.to_thread(store.tenants)
            return 200, {"object": "list", "data": [service.tenant_dict(t) for t in tenants]}, {}
        if len(parts) == 2 and parts[0] == "tenants" and method in ("PUT", "POST", "PATCH"):
            t = await asyncio.to_thread(service.set_tenant, store, parts[1], _json(body))
            await gw.governance.sync()
            return 200, t, {}
        if parts == ["usage"] and method == "GET":
            await gw.governance.sync()  # this process's settled tokens first
            return 200, {"object": "list", "data": await asyncio.to_thread(service.usage, store, q.get("tenant"))}, {}
        if parts == ["audit"] and method == "GET":
            await gw.governance.sync()
            after, limit = _int(q, "after", 0), min(_int(q, "limit", 100), _MAX_PAGE)
            rows = await asyncio.to_thread(store.audit_page, after, limit + 1, service.parse_time(q.get("since")),
                                           service.parse_time(q.get("until"), "until"), q.get("tenant"))  # fmt: skip
            data = [{**json.loads(text), "hash": digest} for _, text, _, digest in rows[:limit]]
            return 200, {"object": "list", "data": data, "has_more": len(rows) > limit,
                         "next_after": data[-1]["seq"] if data else after}, {}  # fmt: skip
        if parts == ["audit", "verify"] and method == "GET":
            await gw.governance.sync()
            return 200, (await asyncio.to_thread(audit.verify, store)).as_dict(), {}
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    raise APIError(404, f"no admin route for {method} {path}", "not_found_error")


def _json(body: bytes) -> dict[str, Any]:
    return json_object(body or b"{}")


def _int(q: dict[str, str], name: str, default: int) -> int:
    v = q.get(name)
    if v is None:
        return default
    if not v.isdigit():
        raise APIError(400, f"{name} must be a whole number", param=name)
    return int(v)
