"""The gateway's request pipeline: stages over one typed per-request context.

::

    identify ─▶ admit ─▶ limits ─▶ semantic ─▶ cache ─▶ queue ─▶ forward (pick, relay)
       │          │         │          │          │        │
    audit ◀──────────── settle ◀────────────── store ◀── release ◀── feedback

Each stage's ``before`` runs in order and may refuse the request (raise an
``APIError``) or answer it itself (set ``ctx.answered``, as a cache hit does). Then the
terminal step forwards it. Whatever happened (an answer, a refusal, a client that
left), the ``after`` of every stage that was entered runs, in reverse order, and sees
the outcome on the context: status, tokens, endpoint, reason. So the limits settle
what a response really used, the cache stores what completed, the audit records every
request, and nothing is threaded through the forwarding code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agora.openai.errors import APIError

if TYPE_CHECKING:
    from agora.router.endpoints import Endpoint
    from agora.router.governance.fairness import Slot
    from agora.router.governance.limits import Reservation
    from agora.router.governance.meter import UsageMeter
    from agora.router.governance.runtime import Identity
    from agora.router.profile import Decision
    from agora.router.request import RequestInfo

logger = logging.getLogger(__name__)


@dataclass
class RequestContext:
    """Everything the stages know of one request, filled in as it goes."""

    scope: dict[str, Any]
    headers: dict[bytes, bytes]  # lower-case names; a repeated header keeps its last value
    receive: Any
    send: Any
    path: str
    api: str  # chat, completions, responses, messages, other
    client: str  # the peer's address
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    time: float = field(default_factory=time.time)
    # admission
    identity: Identity | None = None
    body: bytes = b""  # as the client sent it, until a stage changes ``data``
    data: dict[str, Any] = field(default_factory=dict)
    body_stale: bool = False
    model_requested: str | None = None
    session: str | None = None
    band: str = "interactive"
    # limits
    estimate_in: int = 0
    reserved: int = 0
    reservation: Reservation | None = None
    hide_usage: bool = False  # the gateway asked upstream for a usage chunk the client did not
    # semantic and cache
    semantic: Any = None  # the semantic router's outcome
    cache_ticket: tuple | None = None  # (cache, key, embedding) of a miss that may be stored
    # queue and forwarding
    slot: Slot | None = None
    info: RequestInfo | None = None
    decision: Decision | None = None
    endpoint: Endpoint | None = None
    to_client: dict[str, str] = field(default_factory=dict)  # headers added to the answer
    # outcome
    answered: bool = False  # a stage answered it itself
    status: int | None = None
    reason: str | None = None  # why it was blocked or limited
    complete: bool = False  # the whole answer reached the client
    client_gone: bool = False
    ended_by_shutdown: bool = False  # still running when the gateway's drain ran out (Gateway.end_requests)
    meter: UsageMeter | None = None
    prompt_tokens_header: str | None = None
    kept: bytes | None = None  # the answer's bytes, for the cache
    content_type: str = "application/json"
    first_byte: float | None = None
    finished: float | None = None
    watcher: asyncio.Future | None = None

    @property
    def responded(self) -> bool:
        """The answer's status line went out (the client has bytes of it)."""
        return getattr(self.send, "started", False)

    def tokens(self) -> tuple[int, int]:
        """(in, out) as the response really used them; nothing for a request that was never forwarded or
        that an endpoint refused (an error status, before any output)."""
        if self.meter is None or self.endpoint is None or (self.status is not None and 400 <= self.status != 499):
            return 0, 0
        return self.meter.result(self.prompt_tokens_header, self.estimate_in)

    @property
    def first_token(self) -> float | None:
        """When the first piece of output reached the client: a stream's first content delta (its first bytes
        may be only a role), else the answer's first byte."""
        if self.meter is not None and self.meter.first_delta is not None:
            return self.meter.first_delta
        return self.first_byte

    def changed(self) -> None:
        """A stage changed ``data``: the body is encoded again once, when it is forwarded."""
        self.body_stale = True

    def encoded(self) -> bytes:
        if self.body_stale:
            self.body, self.body_stale = json.dumps(self.data, ensure_ascii=False).encode(), False
        return self.body

    def watch_disconnect(self) -> None:
        """Once the body is read: a client that leaves cancels the rest of the pipeline."""
        task = asyncio.current_task()

        async def watch() -> None:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            self.client_gone = True
            if task is not None:
                task.cancel()

        self.watcher = asyncio.ensure_future(watch())


class Stage:
    """One step of the pipeline. ``before`` may raise an APIError or set ``ctx.answered``;
    ``after`` runs for every stage entered, whatever happened, and must not block."""

    name = "stage"

    async def before(self, ctx: RequestContext) -> None:
        return None

    def after(self, ctx: RequestContext) -> None:
        return None


class Pipeline:
    def __init__(self, stages: list[Stage], forward: Callable[[RequestContext], Awaitable[None]]) -> None:
        self.stages, self.forward = stages, forward

    async def run(self, ctx: RequestContext) -> None:
        entered: list[Stage] = []
        try:
            for stage in self.stages:
                entered.append(stage)
                await stage.before(ctx)
                if ctx.answered:
                    break
            else:
                await self.forward(ctx)
        except APIError as exc:
            ctx.status = exc.status
            ctx.reason = ctx.reason or getattr(exc, "limit", None) or exc.code or exc.type
            raise
        except asyncio.CancelledError:
            ctx.reason = ctx.reason or ("client_gone" if ctx.client_gone else
                                        "shutdown" if ctx.ended_by_shutdown else "cancelled")  # fmt: skip
            raise
        except Exception:
            ctx.status, ctx.reason = 500, "gateway_error"
            raise
        finally:
            if ctx.finished is None:
                ctx.finished = time.perf_counter()
            if ctx.status is None:
                ctx.status = 499 if ctx.client_gone else 500
            for stage in reversed(entered):
                try:
                    stage.after(ctx)
                except Exception:  # noqa: BLE001 - one stage's bookkeeping never breaks another's
                    logger.exception("pipeline stage %s failed after the request", stage.name)
