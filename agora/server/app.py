"""The OpenAI-compatible HTTP API over the async engine.

Every error leaves as an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}``: 400 for bad input, 401 for a missing key, 404 for an unknown model,
413 for an oversized body, 429 when the waiting queue is full, 503 when the
engine is down. A client that disconnects aborts its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import agora
from agora.config import ServerConfig
from agora.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from agora.engine.engine import RequestOutput
from agora.engine.sampler import TokenLogprobs
from agora.engine.sampling import SamplingParams
from agora.server.http import APIError, BodySizeLimit, bearer_token_matches, error_body, error_response
from agora.server.metrics import ServerMetrics
from agora.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    Unsupported,
)

logger = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 64
MAX_CHOICES_PER_REQUEST = 64


def _is_type_name(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none") or "-" in part


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


def build_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    core = engine.engine
    tokenizer = core.tokenizer
    model_name = core.served_model_name
    created = int(time.time())
    metrics = ServerMetrics(lambda: engine.stats, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        engine.shutdown()

    app = FastAPI(title="agora", version=agora.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # -- errors --------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status in (413, 429, 503):
            metrics.rejected.labels(model_name, str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # OpenAI names the top-level parameter; pydantic's union branches ("str", "list[int]") are noise.
        param = loc[0] if loc else None
        where = ".".join(x for x in loc if not _is_type_name(x))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif first.get("type") == "missing":
            message = f"missing required parameter: {param}"
        else:
            message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "internal_error"), 500)

    # -- helpers -------------------------------------------------------------------

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        if not bearer_token_matches(request.headers.get("authorization", ""), config.api_key):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip

    def need_tokenizer() -> Any:
        if tokenizer is None:
            raise APIError(400, "this model was loaded without a tokenizer; send token ids")
        return tokenizer

    def sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.sampling_params()
        except Unsupported as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def submit(prompts: list[list[int]], params: SamplingParams, salt: str | None, base_id: str) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(engine.submit(f"{base_id}-{i}", ids, params, salt))
        except BaseException as exc:
            for s in streams:
                s.close()
            if isinstance(exc, ValueError):
                param = "messages" if base_id.startswith("chatcmpl") else "prompt"
                if "max_tokens" in str(exc) or "context" in str(exc):
                    param = "max_tokens" if "max_tokens" in str(exc) else param
                raise APIError(400, str(exc), param=param) from None
            if isinstance(exc, QueueFullError):
                raise APIError(
                    429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
                ) from None
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc), "service_unavailable") from None
            raise
        return streams

    async def close_all(streams: list[RequestStream]) -> None:
        for s in streams:
            await s.aclose()

    async def collect(request: Request, streams: list[RequestStream], on_output) -> None:  # noqa: ANN001
        """Consume every stream, aborting all of them if the client goes away."""

        async def consume() -> None:
            async for i, out in _merge(streams):
                on_output(i, out)

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    break
            if task.cancelled():
                raise APIError(499, "client disconnected")
            exc = task.exception()
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc), "service_unavailable")
            if exc is not None:
                raise exc
        finally:
            if not task.done():
                task.cancel()
            await close_all(streams)

    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def token_text(token_id: int) -> str:
        return tokenizer.token_to_str(token_id) if tokenizer is not None else str(token_id)

    def chat_logprobs(items: list[TokenLogprobs]) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = token_text(tok)
            return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in items
            ]
        }

    def completion_logprobs(items: list[TokenLogprobs], offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for x in items:
            text = token_text(x.token_id)
            tokens.append(text)
            token_lps.append(max(x.logprob, -9999.0))
            tops.append({token_text(t): max(v, -9999.0) for t, v in x.top} if x.top else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    # -- routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            raise APIError(503, "the engine is not running", "service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": agora.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "agora",
                "root": model_name, "max_model_len": core.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        check_auth(request)
        check_model(req.model)
        tok = need_tokenizer()
        if req.messages is not None:
            text = render_chat(tok, [m.to_template() for m in req.messages], req.add_generation_prompt, None, False)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        check_auth(request)
        check_model(req.model)
        tok = need_tokenizer()
        bad = next((t for t in req.tokens if not 0 <= t < core.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of the vocabulary (0..{core.vocab_size - 1})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    def render_chat(tok: Any, messages: list[dict[str, Any]], add_gen: bool, kwargs: dict | None, cont: bool) -> str:
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=add_gen, template_kwargs=kwargs,
                                           continue_final_message=cont)  # fmt: skip
        except Exception as exc:  # template errors (TemplateError, TypeError, ValueError) are the client's
            raise APIError(400, f"chat template error: {exc}", param="messages") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_auth(request)
        check_model(req.model)
        params = sampling(req)
        raw_prompts = req.prompts()
        if not raw_prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(raw_prompts) > MAX_PROMPTS_PER_REQUEST:
            raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="prompt")
        if len(raw_prompts) * params.n > MAX_CHOICES_PER_REQUEST:
            raise APIError(400, f"prompts x n must be at most {MAX_CHOICES_PER_REQUEST}", param="n")
        prompt_ids: list[list[int]] = []
        for p in raw_prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt must not be empty", param="prompt")
                # Off the event loop: a long prompt takes a while to tokenize.
                prompt_ids.append(await asyncio.to_thread(need_tokenizer().encode, p))
            else:
                prompt_ids.append(p)
        rid = f"cmpl-{uuid.uuid4().hex}"
        start = time.monotonic()
        streams = submit(prompt_ids, params, req.cache_salt, rid)  # validates the token ids
        echo_texts = [""] * len(prompt_ids)
        if req.echo:
            echo_texts = [p if isinstance(p, str) else need_tokenizer().decode(p) for p in raw_prompts]
        tracker = _Tracker(metrics, start)
        n = params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        if req.stream:

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                cached = 0
                offsets = [[len(echo_texts[i])] * n for i in range(len(prompt_ids))]
                try:
                    if req.echo:
                        for i in range(len(prompt_ids)):
                            for j in range(n):
                                yield sse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                           "model": model_name, "choices": [{"index": i * n + j, "text": echo_texts[i],
                                           "logprobs": None, "finish_reason": None}]})  # fmt: skip
                    async for i, out in _merge(streams):
                        tracker.observe((i, out.index), out)
                        completion_tokens += len(out.token_ids)
                        cached = max(cached, out.num_cached_tokens)
                        if not out.text and not out.finished and not out.logprobs:
                            continue
                        choice: dict[str, Any] = {"index": i * n + out.index, "text": out.text, "logprobs": None,
                                                  "finish_reason": out.finish_reason}  # fmt: skip
                        if out.finished:
                            choice["stop_reason"] = out.stop_reason
                        if params.logprobs is not None and out.logprobs:
                            choice["logprobs"] = completion_logprobs(out.logprobs, offsets[i][out.index])
                        offsets[i][out.index] += len(out.text)
                        yield sse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                   "model": model_name, "choices": [choice]})  # fmt: skip
                    if include_usage:
                        prompt_total = sum(len(p) for p in prompt_ids)
                        yield sse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                   "model": model_name, "choices": [],
                                   "usage": usage(prompt_total, completion_tokens, cached)})  # fmt: skip
                    yield "data: [DONE]\n\n"
                except EngineDeadError as exc:
                    yield sse(error_body(str(exc), "service_unavailable"))
                finally:
                    await close_all(streams)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts = [[echo_texts[i]] * n for i in range(len(prompt_ids))]
        lps: list[list[list[TokenLogprobs]]] = [[[] for _ in range(n)] for _ in prompt_ids]
        final: dict[tuple[int, int], RequestOutput] = {}
        counts = {"completion": 0, "cached": 0}

        def on_output(i: int, out: RequestOutput) -> None:
            tracker.observe((i, out.index), out)
            texts[i][out.index] += out.text
            lps[i][out.index].extend(out.logprobs)
            counts["completion"] += len(out.token_ids)
            counts["cached"] = max(counts["cached"], out.num_cached_tokens)
            if out.finished:
                final[(i, out.index)] = out

        await collect(request, streams, on_output)
        choices = []
        for i in range(len(prompt_ids)):
            for j in range(n):
                out = final[(i, j)]
                choices.append({
                    "index": i * n + j, "text": texts[i][j], "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason,
                    "logprobs": completion_logprobs(lps[i][j], len(echo_texts[i])) if params.logprobs is not None else None,
                })  # fmt: skip
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(sum(len(p) for p in prompt_ids), counts["completion"], counts["cached"]),
        })  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check_auth(request)
        check_model(req.model)
        params = sampling(req)
        tok = need_tokenizer()
        messages = [m.to_template() for m in req.messages]
        text = await asyncio.to_thread(
            render_chat, tok, messages, req.add_generation_prompt, req.chat_template_kwargs, req.continue_final_message
        )
        prompt_ids = await asyncio.to_thread(tok.encode, text, False)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        start = time.monotonic()
        streams = submit([prompt_ids], params, req.cache_salt, rid)
        tracker = _Tracker(metrics, start)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        if req.stream:

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                cached = 0

                def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                    return sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model_name, "choices": choices, **extra})  # fmt: skip

                try:
                    for j in range(params.n):
                        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])  # fmt: skip
                    async for _, out in _merge(streams):
                        tracker.observe((0, out.index), out)
                        completion_tokens += len(out.token_ids)
                        cached = max(cached, out.num_cached_tokens)
                        if out.text or (params.logprobs is not None and out.logprobs):
                            choice: dict[str, Any] = {"index": out.index, "delta": {"content": out.text},
                                                      "logprobs": None, "finish_reason": None}  # fmt: skip
                            if params.logprobs is not None and out.logprobs:
                                choice["logprobs"] = chat_logprobs(out.logprobs)
                            yield chunk([choice])
                        if out.finished:
                            yield chunk([{"index": out.index, "delta": {}, "logprobs": None,
                                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}])  # fmt: skip
                    if include_usage:
                        yield chunk([], usage=usage(len(prompt_ids), completion_tokens, cached))
                    yield "data: [DONE]\n\n"
                except EngineDeadError as exc:
                    yield sse(error_body(str(exc), "service_unavailable"))
                finally:
                    await close_all(streams)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts = [""] * params.n
        lps: list[list[TokenLogprobs]] = [[] for _ in range(params.n)]
        final: dict[int, RequestOutput] = {}
        counts = {"completion": 0, "cached": 0}

        def on_output(_: int, out: RequestOutput) -> None:
            tracker.observe((0, out.index), out)
            texts[out.index] += out.text
            lps[out.index].extend(out.logprobs)
            counts["completion"] += len(out.token_ids)
            counts["cached"] = max(counts["cached"], out.num_cached_tokens)
            if out.finished:
                final[out.index] = out

        await collect(request, streams, on_output)
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": texts[j], "tool_calls": []},
                "logprobs": chat_logprobs(lps[j]) if params.logprobs is not None else None,
                "finish_reason": final[j].finish_reason,
                "stop_reason": final[j].stop_reason,
            }
            for j in range(params.n)
        ]
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(len(prompt_ids), counts["completion"], counts["cached"]),
        })  # fmt: skip

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app
