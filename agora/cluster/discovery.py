"""The gateway's view of a Ray Serve app: its running engine replicas, as endpoints.

`RegistryDiscovery` is the gateway's ``discover`` callable (agora.router.gateway.Discover): each
call asks the registry (through the `AgoraApp` ingress or the `Registry` handle) for the replicas
that are running; the gateway adds the new ones to its pool and drops the ones that left, while
it serves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agora.cluster import DISCOVERY_S, TTL_S
from agora.router.endpoints import Endpoint


def endpoint_name(entry: dict) -> str:
    return f"{entry['deployment']}#{entry['replica_id']}"


class RegistryDiscovery:
    """``handle``: the `Registry` deployment's handle. The gateway calls it every
    scrape interval; the registry is asked at most every `DISCOVERY_S` (each ask costs both sides CPU)."""

    def __init__(self, handle: Any, key: str, timeout_s: float = 5.0) -> None:
        self.handle, self.key, self.timeout_s = handle, key, timeout_s
        self._last: tuple[float, list[Endpoint]] | None = None
        self._blank_since: float | None = None  # when the registry started answering with no entry at all

    def entries(self) -> list[dict]:
        return self.handle.list.remote().result(timeout_s=self.timeout_s)

    async def __call__(self) -> list[Endpoint]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < DISCOVERY_S:
            return self._last[1]
        entries = await asyncio.to_thread(self.entries)
        # models from each replica's /v1/models, as for any endpoint (its served name and extra names)
        found = [Endpoint(name=endpoint_name(e), url=e["url"], api_key=self.key)
                 for e in entries if e["state"] == "running"]  # fmt: skip
        if entries:
            self._blank_since = None
        elif self._last is not None and self._last[1]:
            # A registry that knows no replica at all, not even a draining one, has just been restarted (its node
            # died): the replicas register again with their next heartbeat. Until they had time to, keep the
            # replicas known before; a dead one among them is ejected by the gateway's health checks as usual.
            self._blank_since = self._blank_since or now
            if now - self._blank_since < TTL_S:
                return self._last[1]
        self._last = (time.monotonic(), found)
        return found
