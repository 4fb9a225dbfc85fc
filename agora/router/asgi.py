"""Whole ASGI responses, for the gateway's routes and the dashboard's (no framework on the hot path)."""

from __future__ import annotations

import json
from typing import Any


async def send_body(send: Any, status: int, body: bytes, content_type: bytes | str,
                    headers: dict[str, str] | None = None) -> None:  # fmt: skip
    """One response with a known length; header names are sent lower-case."""
    ctype = content_type.encode() if isinstance(content_type, str) else content_type
    raw = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Any, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    await send_body(send, status, json.dumps(payload).encode(), b"application/json", headers)
