"""What every route of the engine server shares: auth, model check, submit, and the one
path from engine outputs to an answer (streamed as SSE, or folded into one JSON body).

::

    route: parse (pydantic, 400) -> check -> prompt ids -> Serving.submit
           -> Serving.answer(streams, answer): every output -> answer.feed -> SSE events
                stream: true  -> the events as they come (answer.start first, answer.end last)
                stream: false -> the same calls, then answer.whole(): one JSON body

An ``Answer`` is the API's encoding over an accumulator: ``OpenAIAnswer`` (chat and text
completions: chunks, ``data: [DONE]``), the Responses API's events, Anthropic's events.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from agora.config import ServerConfig
from agora.engine.async_engine import EngineDeadError, QueueFullError
from agora.engine.client import EngineClient, OutputStream
from agora.engine.engine import RequestOutput
from agora.engine.sampling import ParamError, SamplingParams
from agora.engine.structured import Constraint
from agora.models.catalog import CATALOG
from agora.openai.common import PRIORITY_BANDS, Usage
from agora.openai.errors import APIError, bad_request, error_body
from agora.openai.reasoning import CLOSE, Reasoning, no_reasoning_effort
from agora.openai.stream import SSE_DONE, sse, sse_named
from agora.server.metrics import ServerMetrics
from agora.server.params import param_error


class Accumulator(Protocol):
    def start(self) -> Sequence[BaseModel]: ...
    def feed(self, prompt_index: int, out: RequestOutput) -> Sequence[BaseModel]: ...
    def usage(self) -> Usage: ...
    def usage_chunk(self) -> BaseModel: ...


class Answer(Protocol):
    """One request's answer in its API's encoding."""

    def start(self) -> list[str]: ...  # SSE text before any output
    def feed(self, prompt_index: int, out: RequestOutput) -> list[str]: ...
    def end(self) -> list[str]: ...  # SSE text after the last output
    def failed(self, message: str) -> list[str]: ...  # SSE text when the engine fails mid-stream
    def whole(self) -> Any: ...  # the JSON body of the non-streamed answer (after end())


class Events(Protocol):
    """An API's events over chat chunks (``ResponseEvents``, ``MessageEvents``): typed dicts, and the
    object they build."""

    def start(self) -> list[dict[str, Any]]: ...
    def feed(self, chunk: Any) -> list[dict[str, Any]]: ...
    def finish(self, usage: Usage) -> list[dict[str, Any]]: ...
    def failed(self, message: str) -> list[dict[str, Any]]: ...
    @property
    def result(self) -> BaseModel: ...


class EventsAnswer:
    """The Responses and Messages APIs: the chat accumulator's chunks re-encoded as the API's named
    events (``event:`` + ``data:``); the whole answer is the object the events built."""

    def __init__(self, acc: Any, events: Events) -> None:
        self.acc, self.events = acc, events

    def start(self) -> list[str]:
        self.acc.start()  # the role chunks: these APIs have nothing to say for them
        return [sse_named(e) for e in self.events.start()]

    def feed(self, prompt_index: int, out: RequestOutput) -> list[str]:
        return [sse_named(e) for chunk in self.acc.feed(prompt_index, out) for e in self.events.feed(chunk)]

    def end(self) -> list[str]:
        return [sse_named(e) for e in self.events.finish(self.acc.usage())]

    def failed(self, message: str) -> list[str]:
        return [sse_named(e) for e in self.events.failed(message)]

    def whole(self) -> Any:
        return self.events.result.model_dump(mode="json")


@contextmanager
def renamed(rename: dict[str, str]) -> Iterator[None]:
    """Errors of the chat path, with the parameter named as another API names it."""
    try:
        yield
    except APIError as exc:
        exc.param = rename.get(exc.param or "", exc.param)
        raise


class OpenAIAnswer:
    """Chat and text completions: chunks as ``data:`` events and ``data: [DONE]``; the whole answer is
    the merge of the same chunks."""

    def __init__(self, acc: Accumulator, merge: Callable[..., BaseModel], include_usage: bool) -> None:
        self.acc, self.merge, self.include_usage = acc, merge, include_usage
        self.chunks: list[BaseModel] = []

    def _keep(self, chunks: Sequence[BaseModel]) -> list[str]:
        self.chunks.extend(chunks)
        return [sse(c) for c in chunks]

    def start(self) -> list[str]:
        return self._keep(self.acc.start())

    def feed(self, prompt_index: int, out: RequestOutput) -> list[str]:
        return self._keep(self.acc.feed(prompt_index, out))

    def end(self) -> list[str]:
        return ([sse(self.acc.usage_chunk())] if self.include_usage else []) + [SSE_DONE]

    def failed(self, message: str) -> list[str]:
        return [sse(error_body(message, "service_unavailable"))]

    def whole(self) -> Any:
        return self.merge(self.chunks, self.acc.usage()).model_dump(mode="json")


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


async def _merge(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (prompt index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: OutputStream) -> None:
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


def _special_tag(tok: Any) -> bool:
    """Whether ``</think>`` is one special token, which decoding would drop unless told not to."""
    try:
        ids = tok.encode(CLOSE, False)
        return len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == ""
    except Exception:  # noqa: BLE001 - a tokenizer without the tag: nothing to keep
        return False


def _generation_prompt(tok: Any) -> str:
    """A one-message conversation rendered for a reply: where the model's output starts ("" without a template)."""
    if tok is None or not tok.chat_template_text():
        return ""
    try:
        return tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that needs more than this: requests will show its error
        return ""


class Serving:
    def __init__(self, engine: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.info = info = engine.model_info
        self.tokenizer = info.tokenizer
        self.model_name = info.served_model_name
        # Names agents may send for this model: its served name, extra names, the packaged name, aliases.
        self.model_names = {self.model_name, *config.served_model_aliases}
        if info.model in CATALOG:
            self.model_names.add(info.model)
        self.aliases = config.model_aliases
        tok = self.tokenizer
        self.reasoning = Reasoning.of(tok.chat_template_text() if tok is not None else None, config.reasoning_parser,
                                      special_tags=tok is not None and _special_tag(tok),
                                      generation_prompt=_generation_prompt(tok))  # fmt: skip

    # -- checks -------------------------------------------------------------------------

    def serves(self, name: str) -> bool:
        return name in self.model_names or any(fnmatch.fnmatchcase(name, pattern) for pattern, _ in self.aliases)

    def check_model(self, name: str | None) -> None:
        if name is not None and not self.serves(name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip

    def owner(self, request: Request) -> str:
        """Whose stored responses a request may see: a hash of its API key (the gateway's owner, when the
        gateway authenticated with this server's key), or "" where no key is configured."""
        if self.config.api_key is None:
            return ""
        owner = request.headers.get("x-agora-owner") or request.headers.get("x-agora-tenant")
        if owner:
            return owner  # check_auth passed, so the gateway sent it: the client's own key, hashed there
        given = request.headers.get("authorization") or f"Bearer {request.headers.get('x-api-key', '')}"
        return hashlib.sha256(given.encode()).hexdigest()

    def tenant(self, request: Request) -> str | None:
        """The gateway's tenant (a hash), trusted only where the gateway authenticated with this server's key."""
        if self.config.api_key is None:
            return None
        return request.headers.get("x-agora-tenant") or None

    def priority(self, request: Request, asked: int) -> int:
        """The engine priority of a request: its own (``asked``), within the gateway's band where the engine
        schedules by priority and trusts the gateway (as for the tenant): every request of a band comes before
        the next band's, whatever priority a client asks for."""
        if self.config.api_key is None or not self.info.priority_scheduling:
            return asked
        band = request.headers.get("x-agora-priority")
        if band not in PRIORITY_BANDS:
            return asked
        return PRIORITY_BANDS.index(band) * BAND_STRIDE + asked

    @staticmethod
    def salt(tenant: str | None, cache_salt: str | None) -> str | None:
        """The prefix-cache salt: the tenant's, and the request's own ``cache_salt`` within it."""
        if tenant is None:
            return cache_salt
        return f"{tenant}:{cache_salt}" if cache_salt else tenant

    def template_kwargs(self, effort: str | None, kwargs: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
        """The chat template's arguments for a request's reasoning ``effort`` (``param``: where it was given)."""
        if self.reasoning is None:
            no_reasoning_effort(effort, param)
            return kwargs
        return self.reasoning.template_kwargs(effort, kwargs, param)

    def need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise APIError(400, "this model was loaded without a tokenizer; send token ids")
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_to_str(token_id) if self.tokenizer is not None else str(token_id)

    def token_label(self, as_ids: bool | None) -> Callable[[int], str]:
        """How logprobs name a token: its text, or vLLM's ``token_id:{id}`` (``return_tokens_as_token_ids``)."""
        return token_id_label if as_ids else self.token_text

    def truncate(self, prompt_ids: list[int], keep: int | None) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many as the context holds)."""
        if keep is None:
            return prompt_ids
        limit = self.info.max_model_len
        if keep > limit:
            raise bad_request("truncate_prompt_tokens", f"truncate_prompt_tokens ({keep}) is larger than this "
                                                        f"model's context length ({limit})")  # fmt: skip
        keep = limit if keep == -1 else keep
        return prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids

    # -- submit and answer ----------------------------------------------------------------

    async def compile(self, params: SamplingParams, param: str) -> Constraint | None:
        """The request's compiled constraint; a constraint that cannot work is a 400 naming ``param``."""
        try:
            return await self.engine.compile(params)
        except ParamError as exc:
            raise bad_request(param, f"{param}: {exc}") from None

    def submit(self, prompts: list[list[int]], params: SamplingParams, salt: str | None, base_id: str,
               rename: dict[str, str] | None = None, constraint: Constraint | None = None,
               priority: int = 0) -> list[OutputStream]:  # fmt: skip
        """One engine request per prompt; ``rename`` maps engine parameter names to this API's."""
        streams: list[OutputStream] = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(self.engine.submit(f"{base_id}-{i}", ids, params, salt, constraint, priority))
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

    async def answer(self, request: Request, streams: list[OutputStream], answer: Answer, *, stream: bool,
                     start: float, on_done: Callable[[], Any] | None = None,
                     headers: dict[str, str] | None = None) -> Response:  # fmt: skip
        """Stream or fold the outputs through ``answer``; ``on_done`` runs once the answer is whole."""
        tracker = _Tracker(self.metrics, start)
        if stream:
            return StreamingResponse(self._events(streams, answer, tracker, on_done), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **(headers or {})})  # fmt: skip
        answer.start()

        def on_output(i: int, out: RequestOutput) -> None:
            tracker.observe((i, out.index), out)
            answer.feed(i, out)

        await self._collect(request, streams, on_output)
        answer.end()
        if on_done is not None:
            await on_done()
        return JSONResponse(answer.whole(), headers=headers)

    async def _events(self, streams: list[OutputStream], answer: Answer, tracker: _Tracker,
                      on_done: Callable[[], Any] | None) -> AsyncIterator[str]:  # fmt: skip
        try:
            for piece in answer.start():
                yield piece
            async for i, out in _merge(streams):
                tracker.observe((i, out.index), out)
                for piece in answer.feed(i, out):
                    yield piece
            tail = answer.end()
            if on_done is not None:
                await on_done()
            for piece in tail:
                yield piece
        except EngineDeadError as exc:
            for piece in answer.failed(str(exc)):
                yield piece
        finally:
            for s in streams:
                await s.aclose()

    async def _collect(self, request: Request, streams: list[OutputStream],
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


BAND_STRIDE = 1 << 32  # wider than a request's own priority (a 32-bit integer): bands never overlap


def token_id_label(token_id: int) -> str:
    return f"token_id:{token_id}"


def prompt_header(tokens: int) -> dict[str, str]:
    """The prompt's token count, for the gateway's accounting of a stream the client abandons."""
    return {"x-agora-prompt-tokens": str(tokens)}
