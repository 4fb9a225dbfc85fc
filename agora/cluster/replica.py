"""`EngineReplica`: one agora engine server inside a Ray Serve replica.

The replica builds the engine from a serialized `ServeConfig`, serves the ordinary agora HTTP
API on its node's address (an internal key refuses anyone but the gateway), registers that
address with the `Registry`, and reports its engine's load to Ray Serve's autoscaler
(``record_autoscaling_stats``: running + waiting, the number the `engine_load_policy` scales
on). On scale-down or redeploy it first leaves the registry, waits for its requests to
finish, then stops: a replica that Ray removes fails no request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from typing import Any

import ray
from ray import serve

from agora.cluster import DISCOVERY_S, HEARTBEAT_S
from agora.cluster.registry import ReplicaEntry
from agora.config import ServeConfig

logger = logging.getLogger("agora.cluster")

# How long a draining replica keeps answering after leaving the registry, so that every
# gateway's next poll (every DISCOVERY_S) has dropped it before it stops taking requests.
_LEAVE_S = 2.5 * DISCOVERY_S
_REGISTRY_TIMEOUT_S = 2.0


def node_address(node_id: str) -> str:
    """The address this node was started with (``ray start --node-ip-address``, 127.0.0.1 in local mode):
    the one its peers reach it at, which is not always what the routing table suggests."""
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class _Counting:
    """ASGI wrapper that counts the HTTP requests in progress (the engine only sees submitted ones)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.active = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


@serve.deployment(name="EngineReplica", graceful_shutdown_timeout_s=60, health_check_period_s=5,
                  health_check_timeout_s=30, max_ongoing_requests=1000)  # fmt: skip
class EngineReplica:
    async def __init__(self, config_json: str, api_key: str, registry: Any) -> None:
        import uvicorn

        from agora.engine.async_engine import AsyncEngine
        from agora.engine.engine import Engine
        from agora.http_server import ENGINE_HEAD_BYTES, guarded_protocol, raise_open_files_limit
        from agora.server.app import build_app

        config = ServeConfig.from_json(config_json)
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, api_key=api_key))
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.actor = ctx.replica_id.to_full_id_str()
        self.deployment = ctx.deployment
        self.registry = registry
        # Built in the engine's own thread (the only one that runs OpenMP work), off this event loop.
        self.engine = await asyncio.to_thread(
            AsyncEngine, lambda: Engine(config.engine), config.engine.max_waiting_requests)  # fmt: skip
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ip = node_address(self.node_id)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, 0))  # the node's address: reachable from the gateway's node, key-protected
        self.url = f"http://{self.ip}:{sock.getsockname()[1]}"
        raise_open_files_limit()
        app = build_app(self.engine, config.server)
        self.app = _Counting(app)
        guarded = guarded_protocol(ENGINE_HEAD_BYTES, config.server.client_timeout_s,
                                   refused=app.state.metrics.refused)  # as agora serve's  # fmt: skip
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off", http=guarded,
                                                    timeout_graceful_shutdown=5))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="agora-http", daemon=True)  # fmt: skip
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the engine server did not start on {self.url}")
            await asyncio.sleep(0.05)
        self.state = "running"
        self.started = time.time()
        await self._register()
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())
        logger.info("replica %s serves %s on %s", self.replica_id, self.engine.model_info.served_model_name, self.url)

    # -- registry ------------------------------------------------------------------------

    def entry(self) -> dict:
        s = self.engine.stats
        return dataclasses.asdict(ReplicaEntry(
            replica_id=self.replica_id, actor=self.actor, deployment=self.deployment, url=self.url,
            node_id=self.node_id, node_ip=self.ip,
            model=self.engine.model_info.served_model_name, state=self.state, running=s.num_running,
            waiting=s.num_waiting, kv_usage=s.kv_cache_usage, started=self.started,
        ))  # fmt: skip

    async def _register(self) -> None:
        await asyncio.wait_for(self.registry.register.remote(self.entry()), _REGISTRY_TIMEOUT_S)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._register()
            except Exception as exc:  # noqa: BLE001 - the registry restarting: the next beat fills it again
                logger.warning("replica %s: registry heartbeat failed: %s", self.replica_id, exc)

    # -- Ray Serve hooks -------------------------------------------------------------------

    def load(self) -> int:
        s = self.engine.stats
        return max(self.app.active, s.num_running + s.num_waiting)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_load": float(self.load())}

    async def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise RuntimeError("the engine thread stopped")
        if not self.thread.is_alive():
            raise RuntimeError("the engine's HTTP server stopped")

    async def __del__(self) -> None:
        """Leave the registry, let the gateways notice, finish every request, then stop."""
        self.state = "draining"
        self._beat.cancel()
        try:
            await self._register()  # the gateways drop a draining replica at their next poll
        except Exception:  # noqa: BLE001 - a registry that is gone lists nobody anyway
            pass
        await asyncio.sleep(_LEAVE_S)
        deadline = time.monotonic() + 50
        while self.load() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 10)
        await asyncio.to_thread(self.engine.shutdown)
        try:
            await asyncio.wait_for(self.registry.unregister.remote(self.replica_id), _REGISTRY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the app is being deleted: the registry may be gone already
            pass
