"""What every route of the engine server shares: auth, model check, submit, and the one
path from engine outputs to an answer (streamed as SSE, or folded into one JSON body).

::

    route: parse (pydantic, 400) -> check -> prompt ids -> Serving.submit
           -> Serving.answer(streams, accumulator): every output -> accumulator.feed -> chunks
                stream: true  -> each chunk as an SSE event, then [DONE]
                stream: false -> merge(chunks) -> one JSON body
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from agora.config import ServerConfig
from agora.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from agora.engine.engine import RequestOutput
from agora.engine.sampling import ParamError, SamplingParams
from agora.engine.structured import Constraint
from agora.openai.common import Usage
from agora.openai.errors import APIError, bad_request, bearer_token_matches, error_body
from agora.openai.stream import SSE_DONE, sse
from agora.server.metrics import ServerMetrics
from agora.server.params import param_error


class Accumulator(Protocol):
    def start(self) -> Sequence[BaseModel]: ...
    def feed(self, prompt_index: int, out: RequestOutput) -> Sequence[BaseModel]: ...
    def usage(self) -> Usage: ...
    def usage_chunk(self) -> BaseModel: ...


class _Tracker:
    """Per-choice timing for the latency histograms."""

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: dict[tuple[int, int], float] = {}

    def observe(self, key: tuple[int, int], out: RequestOutput) -> None:
        now = time.monotonic()
        if out.token_ids:
            prev = self.last.get(key)
            if prev is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe(now - prev)
            self.last[key] = now
        if out.finished:
            self.metrics.e2e.observe(now - self.start)
            self.metrics.gen_len.observe(out.num_output_tokens)
            self.metrics.success.labels(self.metrics.model_name, out.finish_reason or "abort").inc()
            if key[1] == 0:
                self.metrics.prompt_len.observe(out.num_prompt_tokens)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (prompt index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await merged.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await merged.put((i, exc))
        finally:
            await merged.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            i, item = await merged.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class Serving:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        core = engine.engine
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_name = core.served_model_name

    # -- checks -------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is not None and not bearer_token_matches(request.headers.get("authorization", ""), key):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip

    def need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise APIError(400, "this model was loaded without a tokenizer; send token ids")
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_to_str(token_id) if self.tokenizer is not None else str(token_id)

    # -- submit and answer ----------------------------------------------------------------

    async def compile(self, params: SamplingParams, param: str) -> Constraint | None:
        """The request's compiled constraint; a constraint that cannot work is a 400 naming ``param``."""
        try:
            return await self.engine.compile(params)
        except ParamError as exc:
            raise bad_request(param, f"{param}: {exc}") from None

    def submit(self, prompts: list[list[int]], params: SamplingParams, salt: str | None, base_id: str,
               rename: dict[str, str] | None = None, constraint: Constraint | None = None) -> list[RequestStream]:  # fmt: skip
        """One engine request per prompt; ``rename`` maps engine parameter names to this API's."""
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(self.engine.submit(f"{base_id}-{i}", ids, params, salt, constraint))
        except BaseException as exc:
            for s in streams:
                s.close()
            if isinstance(exc, ParamError):
                raise param_error(exc, rename) from None
            if isinstance(exc, QueueFullError):
                raise APIError(
                    429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
                ) from None
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc), "service_unavailable") from None
            raise
        return streams

    async def answer(self, request: Request, streams: list[RequestStream], acc: Accumulator, *, stream: bool,
                     include_usage: bool, merge: Callable[..., BaseModel], start: float) -> Response:  # fmt: skip
        tracker = _Tracker(self.metrics, start)
        if stream:
            return StreamingResponse(self._events(streams, acc, tracker, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        chunks: list[BaseModel] = list(acc.start())

        def on_output(i: int, out: RequestOutput) -> None:
            tracker.observe((i, out.index), out)
            chunks.extend(acc.feed(i, out))

        await self._collect(request, streams, on_output)
        return JSONResponse(merge(chunks, acc.usage()).model_dump(mode="json"))

    async def _events(self, streams: list[RequestStream], acc: Accumulator, tracker: _Tracker,
                      include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        try:
            for chunk in acc.start():
                yield sse(chunk)
            async for i, out in _merge(streams):
                tracker.observe((i, out.index), out)
                for chunk in acc.feed(i, out):
                    yield sse(chunk)
            if include_usage:
                yield sse(acc.usage_chunk())
            yield SSE_DONE
        except EngineDeadError as exc:
            yield sse(error_body(str(exc), "service_unavailable"))
        finally:
            for s in streams:
                await s.aclose()

    async def _collect(self, request: Request, streams: list[RequestStream],
                       on_output: Callable[[int, RequestOutput], None]) -> None:  # fmt: skip
        """Consume every stream; abort all of them the moment the client goes away."""

        async def consume() -> None:
            async for i, out in _merge(streams):
                on_output(i, out)

        async def disconnected() -> None:
            # The body is read: the next message the server has for us is the client leaving.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.create_task(consume())
        watcher = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                raise APIError(499, "client disconnected")
            exc = task.exception()
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc), "service_unavailable")
            if exc is not None:
                raise exc
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            for s in streams:
                await s.aclose()
