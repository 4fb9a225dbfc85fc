"""The gateway: one OpenAI endpoint in front of many backend endpoints.

A plain ASGI app (no framework on the hot path). For each POST under ``/v1`` it
parses the body once, admits (model, health, in-flight limit), runs the scheduling
profile, and forwards the body untouched. The answer streams back chunk by chunk.

::

    client ──▶ read body (413) ──▶ admit (404/503/429) ──▶ profile ──▶ POST upstream
                                        ▲                                   │
                                        └── retry elsewhere: connect error, ┘
                                            5xx or 429 before the first byte

Nothing is retried once a byte has reached the client. A client that goes away
cancels the upstream request (its connection is closed, which a server such as
agora or vLLM treats as an abort). The gateway never imports torch.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiohttp

import agora
from agora.openai.errors import APIError, bearer_token_matches, error_body
from agora.openai.messages import Reply, anthropic_error
from agora.router.admission import admit
from agora.router.config import ConfigError, RouterConfig, load_config
from agora.router.endpoints import Endpoint, EndpointPool
from agora.router.metrics import GatewayMetrics
from agora.router.request import RequestInfo
from agora.router.semantic.cache import (
    Answer,
    CacheKey,
    SemanticCache,
    answer_from_json,
    answer_from_sse,
    replay_json,
    replay_sse,
)
from agora.router.semantic.router import SemanticRouter

logger = logging.getLogger(__name__)

# Client headers passed upstream; everything else (hop-by-hop, the gateway's own key) stays here.
_FORWARD_REQUEST = (b"content-type", b"accept", b"x-request-id", b"traceparent", b"tracestate",
                    b"anthropic-version", b"anthropic-beta")  # fmt: skip
_FORWARD_RESPONSE = ("content-type", "x-request-id", "retry-after", "cache-control", "x-agora-response-id")
_MAX_CACHED_BYTES = 4 << 20  # answers larger than this are passed on but not cached
_SSE_DONE = (b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n")  # the end of an OpenAI event stream
_CACHEABLE_FINISH = ("stop", "length", "tool_calls")  # answers that ran to a natural end
_SEMANTIC_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
_MAX_CHAINS = 100_000  # response ids remembered for previous_response_id affinity


class _ClientGone(Exception):
    pass


class Gateway:
    """The ASGI app. ``endpoints`` may be given directly (``agora serve --replicas``), else from the config."""

    def __init__(self, config: RouterConfig, endpoints: list[Endpoint] | None = None,
                 config_path: str | None = None) -> None:  # fmt: skip
        self.config = config
        self.config_path = config_path  # for POST /admin/reload and the file watch
        self.settings = config.gateway
        self.pool = EndpointPool(endpoints if endpoints is not None else config.build_endpoints(),
                                 config.gateway.health())  # fmt: skip
        self.profile = config.build_profile()
        self.metrics = GatewayMetrics(self.pool, self.profile)
        self.pool.on_eject.append(self.profile.on_eject)
        self.pool.on_eject.append(lambda ep: self.metrics.ejections.labels(ep.name).inc())
        self.session: aiohttp.ClientSession | None = None
        self._created = int(time.time())
        self.semantic: SemanticRouter | None = None  # built at startup: loading the encoder takes seconds
        self.chains: OrderedDict[str, tuple[str, str]] = OrderedDict()  # response id -> (session, endpoint)
        self._watch: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def startup(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await self.pool.start(self.session)
        if self.config.semantic is not None:
            self.semantic = await asyncio.to_thread(SemanticRouter, self.config.semantic)
            if self.config.semantic.watch_interval_s > 0 and self.config_path:
                self._watch = asyncio.create_task(self._watch_config(self.config.semantic.watch_interval_s))
        names = ", ".join(f"{ep.name}{'' if ep.healthy else ' (not ready)'}" for ep in self.pool)
        logger.info("gateway profile %s over %d endpoints: %s", self.profile.name, len(self.pool.endpoints), names)

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        try:
            await self.pool.stop()
        finally:
            if self.session is not None:
                await self.session.close()
                self.session = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except APIError as exc:
            if exc.status != 401:
                self.metrics.rejected.labels(str(exc.status)).inc()
            if scope["path"].startswith("/v1/messages"):  # Anthropic's API: Anthropic's error shape
                status, body = anthropic_error(exc)
                await _send_json(send, status, body, exc.headers)
            else:
                await _send_json(send, exc.status, exc.body(), exc.headers)
        except _ClientGone:
            self.metrics.disconnects.inc()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routes ------------------------------------------------------------------------

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])  # lower-case byte names; a repeated header keeps its last value
        if method == "POST" and path == "/v1/classify":
            self._check_auth(headers)
            await self._classify(headers, receive, send)
        elif method == "POST" and path == "/admin/reload":
            self._check_auth(headers)
            await _send_json(send, 200, await self.reload())
        elif method == "POST" and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            self._check_auth(headers)
            await self._proxy(scope, headers, receive, send)
        elif method in ("GET", "DELETE") and path.startswith("/v1/responses/"):
            self._check_auth(headers)
            await self._stored(scope, headers, send)
        elif method == "GET" and path == "/health":
            ok = any(ep.available(time.monotonic()) for ep in self.pool)
            if not ok:
                raise APIError(503, "no healthy endpoint", "service_unavailable", code="no_healthy_endpoint")
            await _send_json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/metrics":
            await _send(send, 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")
        elif method == "GET" and path == "/version":
            await _send_json(send, 200, {"version": agora.__version__})
        elif method == "GET" and path == "/v1/models":
            self._check_auth(headers)
            await _send_json(send, 200, {"object": "list", "data": [self._card(m) for m in self._models()]})
        elif method == "GET" and path.startswith("/v1/models/"):
            self._check_auth(headers)
            model = path.removeprefix("/v1/models/")
            if model not in self._models():
                raise APIError(
                    404, f"the model {model!r} does not exist", "not_found_error", "model", "model_not_found"
                )
            await _send_json(send, 200, self._card(model))
        else:
            raise APIError(404, f"no route for {method} {path}", "not_found_error")

    def _models(self) -> list[str]:
        """The endpoints' models, plus the semantic router's alias (``auto``) when it is configured."""
        models = self.pool.models()
        semantic = self.semantic
        if semantic is not None and semantic.spec.auto_model not in models:
            models.append(semantic.spec.auto_model)
        return models

    def _card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "agora"}

    def _check_auth(self, headers: dict[bytes, bytes]) -> None:
        """``Authorization: Bearer KEY``, or Anthropic's ``x-api-key: KEY``."""
        key = self.settings.api_key
        if key is not None and not bearer_token_matches(_credential(headers), key):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def _alias(self, model: str) -> str:
        """The served model an alias (a name or a glob) stands for; the name itself otherwise."""
        aliases = self.config.model_aliases
        if model in aliases:
            return aliases[model]
        return next((target for pattern, target in aliases.items() if fnmatch.fnmatchcase(model, pattern)), model)

    def _upstream_headers(self, headers: dict[bytes, bytes]) -> dict[str, str]:
        """What reaches the endpoints: a few client headers, the client's key (where the gateway has none
        of its own), and the tenant (a hash of the client's key), which endpoints trust from the gateway."""
        out = {k.decode(): v.decode("latin-1") for k, v in headers.items() if k in _FORWARD_REQUEST}
        if self.settings.api_key is None:
            for name in (b"authorization", b"x-api-key"):
                if name in headers:
                    out[name.decode()] = headers[name].decode("latin-1")
        out["x-agora-tenant"] = _tenant(headers)
        return out

    # -- proxying ----------------------------------------------------------------------

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _proxy(self, scope: dict[str, Any], headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
        body = await self._read_body(headers, receive)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        if "model" in data and not isinstance(data["model"], str):
            raise APIError(400, "model must be a string", param="model")
        if isinstance(data.get("model"), str) and self._alias(data["model"]) != data["model"]:
            data["model"] = self._alias(data["model"])
            body = json.dumps(data, ensure_ascii=False).encode()
        extra: dict[str, str] = {}
        cache: tuple[SemanticCache, CacheKey, Any] | None = None
        semantic = self.semantic
        if semantic is not None and scope["path"] in _SEMANTIC_PATHS:
            tenant = _tenant(headers)
            t = time.perf_counter()
            outcome = await asyncio.to_thread(semantic.process, scope["path"], data, tenant)
            self.metrics.classify_seconds.observe(time.perf_counter() - t)
            self.metrics.decisions.labels(outcome.decision).inc()
            for kind in {s.type for s in outcome.signals.pii}:
                self.metrics.pii_found.labels(kind).inc()
            if outcome.error is not None:
                if outcome.error.status == 403:
                    self.metrics.blocked.labels(outcome.error.code or "blocked").inc()
                raise outcome.error
            extra = outcome.headers
            if semantic.cache is not None:
                if outcome.cache_key is None:
                    self.metrics.cache.labels("bypass").inc()
                elif outcome.cached is not None:
                    answer, kind = outcome.cached
                    self.metrics.cache.labels(f"hit_{kind}").inc()
                    await _send_cached(send, answer, data, {**extra, "x-agora-cache": f"hit-{kind}"})
                    return
                else:
                    self.metrics.cache.labels("miss").inc()
                    cache = (semantic.cache, outcome.cache_key, outcome.embedding)
            if outcome.body is not data:
                data = outcome.body
                body = json.dumps(data, ensure_ascii=False).encode()
        header = headers.get(self.settings.session_header.lower().encode())
        session = header.decode("latin-1") if header else None
        if session is None and scope["path"] == "/v1/responses":
            # A Responses chain is one session: its turns stay on the replica that holds its prefix.
            previous = data.get("previous_response_id")
            known = self.chains.get(previous) if isinstance(previous, str) else None
            session = known[0] if known is not None else f"chain-{uuid.uuid4().hex}"
        req = RequestInfo.from_body(scope["path"], data, session)
        upstream_headers = self._upstream_headers(headers)
        path = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")

        exchange = asyncio.ensure_future(self._exchange(req, path, body, upstream_headers, send, extra, cache))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((exchange, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = watcher.done()
            watcher.cancel()
            if not exchange.done():  # the client went away first (or we are shutting down)
                exchange.cancel()
        try:
            await exchange
        except asyncio.CancelledError:
            if not client_gone:
                raise
            self.metrics.disconnects.inc()

    async def _exchange(self, req: RequestInfo, path: str, body: bytes, headers: dict[str, str], send: Any,
                        extra: dict[str, str], cache: tuple | None) -> None:  # fmt: skip
        assert self.session is not None
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        tried: list[str] = []
        last: tuple[int, bytes, dict[str, str]] | None = None  # the last retriable answer, if we run out
        for attempt in range(s.retries + 1):
            t = time.perf_counter()
            try:
                candidates = admit(self.pool, req.model, s.max_in_flight_per_endpoint, tried)
            except APIError:
                if last is None:
                    raise
                break  # nowhere left to retry: give the client the last upstream answer
            decision = self.profile.pick(req, candidates)
            self.metrics.pick_seconds.observe(time.perf_counter() - t)
            ep = decision.endpoint
            if attempt == 0 and "prefix_blocks" in req.notes:
                self.metrics.prefix(*req.notes["prefix_blocks"])
            send_headers = dict(headers)
            if ep.api_key:
                send_headers["authorization"] = f"Bearer {ep.api_key}"
            ep.in_flight += 1
            try:
                try:
                    resp = await self.session.post(ep.url + path, data=body, headers=send_headers, timeout=timeout)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
                    self.metrics.errors.labels(ep.name, kind).inc()
                    self.pool.record_failure(ep, f"{kind}: {type(exc).__name__}: {exc}")
                    last = (502, json.dumps(error_body(f"endpoint {ep.name} failed: {kind}", "bad_gateway",
                                                       code="upstream_error")).encode(), {})  # fmt: skip
                else:
                    if resp.status >= 500 or resp.status == 429:
                        payload = await resp.read()
                        resp.release()
                        if resp.status >= 500:
                            self.metrics.errors.labels(ep.name, "status_5xx").inc()
                            self.pool.record_failure(ep, f"HTTP {resp.status}")
                        last = (resp.status, payload, _response_headers(resp))
                    else:
                        self.pool.record_success(ep)
                        await self._relay(resp, ep, decision.explain(), send, extra, cache, req.session)
                        return
            finally:
                ep.in_flight -= 1
            tried.append(ep.name)
            if attempt < s.retries:
                self.metrics.retries.labels(ep.name).inc()
        assert last is not None
        status, payload, last_extra = last
        self.metrics.requests.labels(tried[-1], str(status)).inc()
        await _send(send, status, payload, last_extra.pop("content-type", "application/json").encode(),
                    {**extra, **last_extra, "x-agora-endpoint": tried[-1]})  # fmt: skip

    async def _relay(self, resp: aiohttp.ClientResponse, ep: Endpoint, why: str, send: Any,
                     extra: dict[str, str], cache: tuple | None, session: str | None = None) -> None:  # fmt: skip
        """Stream the upstream answer to the client as it comes; close upstream if we stop early.

        With a cache key, the answer is also kept (up to ``_MAX_CACHED_BYTES``) and stored once complete.
        """
        headers = {**extra, **_response_headers(resp)}
        response_id = resp.headers.get("x-agora-response-id")
        if response_id:  # the next turn of this chain (previous_response_id) goes where its prefix is
            self.chains[response_id] = (session or response_id, ep.name)
            while len(self.chains) > _MAX_CHAINS:
                self.chains.popitem(last=False)
        keep: list[bytes] | None = [] if cache is not None and resp.status == 200 else None
        kept = 0
        content_type = headers.pop("content-type", "application/json").encode()
        headers["x-agora-endpoint"] = ep.name
        headers["x-agora-scores"] = why  # total score per candidate endpoint
        raw = [(b"content-type", content_type)] + [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
        complete = False
        # OpenAI's clients stop reading at an event stream's `data: [DONE]` and close at once, while
        # the backend may end its body a moment later: the answer is whole at [DONE], so the relay
        # ends there instead of waiting for the body's end and seeing a client that went away.
        sse, tail = content_type.startswith(b"text/event-stream"), b""
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": raw})
            try:
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if keep is not None:
                        kept += len(chunk)
                        keep = keep if kept <= _MAX_CACHED_BYTES else None
                        if keep is not None:
                            keep.append(chunk)
                    if sse:
                        tail = (tail + chunk[-32:])[-32:]  # no copy of a large chunk
                        if tail.endswith(_SSE_DONE):  # the whole event, blank line included
                            break
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Bytes already went out: no retry. End the connection without a final chunk so that
                # the client sees a broken response, not a short one that looks complete.
                self.metrics.errors.labels(ep.name, "stream").inc()
                self.pool.record_failure(ep, f"stream broke: {type(exc).__name__}")
                logger.warning("endpoint %s broke off a response: %s", ep.name, exc)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
            self.metrics.requests.labels(ep.name, str(resp.status)).inc()
            if keep is not None and cache is not None:
                self._store(cache, b"".join(keep), content_type.decode("latin-1"))
        finally:
            if complete:
                resp.release()
            else:
                resp.close()  # drop the connection: the backend sees the client gone and aborts

    def _store(self, cache: tuple, payload: bytes, content_type: str) -> None:
        store, key, embedding = cache
        if content_type.startswith("text/event-stream"):
            answer = answer_from_sse(payload, key.kind)
        else:
            answer = answer_from_json(payload, key.kind)
        if answer is not None and _ran_to_an_end(answer):
            store.store(key, answer, embedding)
            self.metrics.cache.labels("store").inc()

    async def _stored(self, scope: dict[str, Any], headers: dict[bytes, bytes], send: Any) -> None:
        """GET / DELETE of a stored response: first where the chain was last served, then elsewhere
        (the replicas of one machine share one store; separate machines each hold their own)."""
        assert self.session is not None
        rid = scope["path"].removeprefix("/v1/responses/").split("/", 1)[0]
        known = self.chains.get(rid)
        now = time.monotonic()
        candidates = sorted((ep for ep in self.pool if ep.available(now)), key=lambda ep: known is None or
                            ep.name != known[1])  # fmt: skip
        if not candidates:
            raise APIError(503, "no healthy endpoint", "service_unavailable", code="no_healthy_endpoint")
        upstream = self._upstream_headers(headers)
        query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.read_timeout_s)  # fmt: skip
        last: tuple[int, bytes, dict[str, str]] | None = None
        for ep in candidates:
            send_headers = {**upstream, **({"authorization": f"Bearer {ep.api_key}"} if ep.api_key else {})}
            try:
                async with self.session.request(scope["method"], ep.url + scope["path"] + query,
                                                headers=send_headers, timeout=timeout) as resp:  # fmt: skip
                    last = (resp.status, await resp.read(), _response_headers(resp))
            except (TimeoutError, aiohttp.ClientError):
                continue
            if last[0] != 404:
                break
        if last is None:
            raise APIError(502, "no endpoint answered", "bad_gateway", code="upstream_error")
        status, payload, extra = last
        await _send(send, status, payload, extra.pop("content-type", "application/json").encode(), extra)

    # -- semantic routing: classify, reload -----------------------------------------------

    async def _classify(self, headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
        if self.semantic is None:
            raise APIError(404, "semantic routing is not configured (no semantic: section)", "not_found_error")
        try:
            data = json.loads(await self._read_body(headers, receive))
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        semantic = self.semantic
        await _send_json(send, 200, await asyncio.to_thread(semantic.classify, data))

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file's semantic section; on any error keep the running one."""
        if not self.config_path:
            raise APIError(400, "the gateway was not started from a config file: nothing to reload")
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            semantic = await asyncio.to_thread(SemanticRouter, config.semantic) if config.semantic else None
        except (ConfigError, ValueError, OSError) as exc:
            logger.error("config reload failed, keeping the running config: %s", exc)
            raise APIError(400, f"reload failed, the running config is unchanged: {exc}", code="invalid_config")                 from None  # fmt: skip
        self.semantic = semantic
        self.config = self.config.model_copy(update={"semantic": config.semantic})
        logger.info("reloaded the semantic config from %s", self.config_path)
        return {"reloaded": ["semantic"], "decisions": [d.name for d in config.semantic.decisions]
                if config.semantic else [], "note": "endpoints, plugins and profiles change on restart"}  # fmt: skip

    async def _watch_config(self, interval: float) -> None:
        path = Path(self.config_path or "")
        last = path.stat().st_mtime if path.exists() else 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if mtime != last:
                last = mtime
                try:
                    await self.reload()
                except APIError:
                    pass  # logged; the old config stays


async def _send_cached(send: Any, answer: Answer, body: dict[str, Any], headers: dict[str, str]) -> None:
    """A cache hit as the client asked for it: one JSON body, or a replayed stream (with usage if asked)."""
    if body.get("stream") is not True:
        await _send(send, 200, replay_json(answer), b"application/json", headers)
        return
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = bool(options.get("include_usage") or options.get("continuous_usage_stats"))
    raw = [(b"content-type", b"text/event-stream")] + [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    for chunk in replay_sse(answer, include_usage):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _ran_to_an_end(answer: Answer) -> bool:
    if isinstance(answer, Reply):
        return answer.stop_reason in ("end_turn", "max_tokens", "stop_sequence", "tool_use")
    return all(c.finish_reason in _CACHEABLE_FINISH for c in answer.choices)


def _credential(headers: dict[bytes, bytes]) -> str:
    """The client's key as an ``Authorization`` value (Anthropic clients send ``x-api-key``)."""
    given = headers.get(b"authorization", b"").decode("latin-1")
    if not given and b"x-api-key" in headers:
        given = "Bearer " + headers[b"x-api-key"].decode("latin-1")
    return given


def _tenant(headers: dict[bytes, bytes]) -> str:
    """Who is asking, without their key: a hash of it (the cache's scope, the store's owner)."""
    return hashlib.sha256(_credential(headers).encode("latin-1")).hexdigest()


def _response_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: resp.headers[k] for k in _FORWARD_RESPONSE if k in resp.headers}


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send(send: Any, status: int, body: bytes, content_type: bytes,
                headers: dict[str, str] | None = None) -> None:  # fmt: skip
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send: Any, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(payload).encode(), b"application/json", headers)
