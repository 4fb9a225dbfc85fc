"""A uvicorn server that drains: on SIGTERM or Ctrl-C it refuses new connections, lets the requests in flight
run for a while, then asks the application to end what is still running, so that each such request ends with an
error in its own API's shape (an SSE error event; a 503 for a whole answer) rather than a connection cut
mid-stream. `agora serve` (the engine server) and `agora route` (the gateway) both stop this way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import uvicorn

logger = logging.getLogger("agora")

MARGIN_S = 10.0  # past the drain: the ended requests' last events go out, then uvicorn cancels what is left


def draining_server(app: Any, drain_s: float, end_requests: Callable[[], None],
                    on_signal: Callable[[], None] | None = None, **options: Any) -> uvicorn.Server:  # fmt: skip
    """A server for ``app`` (uvicorn ``options``) that calls ``end_requests`` (on the event loop, must not block)
    ``drain_s`` seconds after the shutdown began, if requests are still running then; ``on_signal`` (any thread)
    runs as soon as the signal arrives."""
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_s + MARGIN_S, **options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_signal is not None:
                on_signal()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list | None = None) -> None:
            def end() -> None:
                if self.server_state.tasks:
                    logger.warning("shutting down: ending the %d requests still in flight after %.0f s",
                                   len(self.server_state.tasks), drain_s)  # fmt: skip
                end_requests()

            timer = asyncio.get_running_loop().call_later(drain_s, end)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)
