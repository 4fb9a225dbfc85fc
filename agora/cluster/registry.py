"""The replica registry: which engine replicas serve, where, and how loaded.

A small Serve deployment (one replica). Each engine replica registers its address on start
and again with every heartbeat (so a restarted registry fills up within one heartbeat), and
leaves it before it drains; an entry without a heartbeat for ``ttl_s`` is dropped (a killed
replica never says goodbye). Gateways poll `list`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ray import serve

from agora.cluster import TTL_S


@dataclass
class ReplicaEntry:
    replica_id: str  # Serve's replica id: unique per replica start
    actor: str  # the replica actor's name (namespace "serve"): ray.get_actor(actor, namespace="serve")
    deployment: str
    url: str  # http://node-ip:port of its engine server
    node_id: str
    node_ip: str
    model: str  # the served model name
    state: str = "running"  # running, draining
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    started: float = 0.0
    seen: float = 0.0


@serve.deployment(name="Registry", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Registry:
    def __init__(self, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self.entries: dict[str, ReplicaEntry] = {}

    def register(self, entry: dict) -> None:
        e = ReplicaEntry(**entry)
        e.seen = time.time()
        self.entries[e.replica_id] = e

    def unregister(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def list(self) -> list[dict]:
        now = time.time()
        for rid in [rid for rid, e in self.entries.items() if now - e.seen > self.ttl_s]:
            del self.entries[rid]
        return [asdict(e) for e in self.entries.values()]
