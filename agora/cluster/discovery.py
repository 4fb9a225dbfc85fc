"""The gateway's view of a Ray Serve app: its running engine replicas, as endpoints.

`RegistryDiscovery` is the gateway's ``discover`` callable (agora.router.gateway.Discover): each
call asks the registry (through the `AgoraApp` ingress or the `Registry` handle) for the replicas
that are running; the gateway adds the new ones to its pool and drops the ones that left, while
it serves.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agora.router.endpoints import Endpoint


def endpoint_name(entry: dict) -> str:
    return f"{entry['deployment']}#{entry['replica_id']}"


class RegistryDiscovery:
    def __init__(self, handle: Any, key: str, method: str = "list", timeout_s: float = 5.0) -> None:
        self.handle, self.key, self.method, self.timeout_s = handle, key, method, timeout_s

    def entries(self) -> list[dict]:
        return getattr(self.handle, self.method).remote().result(timeout_s=self.timeout_s)

    async def __call__(self) -> list[Endpoint]:
        entries = await asyncio.to_thread(self.entries)
        # models from each replica's /v1/models, as for any endpoint (its served name and extra names)
        return [Endpoint(name=endpoint_name(e), url=e["url"], api_key=self.key)
                for e in entries if e["state"] == "running"]  # fmt: skip
