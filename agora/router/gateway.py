"""The gateway: one OpenAI endpoint in front of many backend endpoints.

A plain ASGI app (no framework on the hot path). Every POST under ``/v1`` runs the
request pipeline (``pipeline.py``, stages in ``stages.py``): identify the caller, admit
the body and model, take limits, semantic guards, cache lookup, fair queue, then pick
an endpoint and forward the body. The answer streams back chunk by chunk, and the
stages see it on the way out (usage settled, audit written, cache stored).

::

    client ──▶ identify (401) ──▶ admit (413/400/403) ──▶ limits (429) ──▶ semantic (403) ──▶ cache
           ──▶ queue (fair, by band and tenant) ──▶ pick (404/503/429) ──▶ POST upstream
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
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

import agora
from agora.openai.common import json_object
from agora.openai.errors import APIError, error_body
from agora.openai.messages import Reply, anthropic_error
from agora.openai.stream import stream_error
from agora.router import admin
from agora.router.admission import admit
from agora.router.asgi import send_body, send_json
from agora.router.config import ConfigError, RouterConfig, load_config
from agora.router.dashboard import Dashboard
from agora.router.endpoints import Endpoint, EndpointPool
from agora.router.governance.fairness import FairQueue
from agora.router.governance.meter import EventSplitter, UsageMeter, api_of
from agora.router.governance.runtime import Governance, Identity, is_loopback
from agora.router.governance.store import Limits
from agora.router.metrics import GatewayMetrics
from agora.router.pipeline import Pipeline, RequestContext
from agora.router.request import RequestInfo
from agora.router.semantic.cache import (
    Answer,
    answer_from_json,
    answer_from_sse,
    replay_json,
    replay_sse,
)
from agora.router.semantic.router import SemanticRouter
from agora.router.stages import pipeline_stages

logger = logging.getLogger(__name__)

# Client headers passed upstream; everything else (hop-by-hop, the gateway's own key) stays here.
_FORWARD_REQUEST = (b"content-type", b"accept", b"x-request-id", b"traceparent", b"tracestate",
                    b"anthropic-version", b"anthropic-beta")  # fmt: skip
_FORWARD_RESPONSE = ("content-type", "x-request-id", "retry-after", "cache-control", "x-agora-response-id")
# Where a gateway over a changing replica set (agora.cluster) learns the current endpoints.
Discover = Callable[[], Awaitable[list[Endpoint]]]

_MAX_CACHED_BYTES = 4 << 20  # answers larger than this are passed on but not cached
_CACHEABLE_FINISH = ("stop", "length", "tool_calls")  # answers that ran to a natural end
_MAX_METERED_BYTES = 8 << 20  # a JSON answer larger than this is counted from its deltas' estimate only
_MAX_TARPITS = 256  # clients held back at once for sending wrong keys
_MAX_CHAINS = 100_000  # response ids remembered for previous_response_id affinity
_SHUTTING_DOWN = "the server is shutting down; retry the request"  # the engines say the same


def _next_sequence(meter: UsageMeter | None) -> int:
    return meter.next_sequence if meter is not None else 0


class _Send:
    """One request's ASGI ``send``, noting whether its answer has begun (``started``)."""

    __slots__ = ("send", "started")

    def __init__(self, send: Any) -> None:
        self.send, self.started = send, False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class _ClientGone(Exception):
    pass


class Gateway:
    """The ASGI app. ``endpoints`` may be given directly (``agora serve --replicas``), else from the config."""

    def __init__(self, config: RouterConfig, endpoints: list[Endpoint] | None = None,
                 config_path: str | None = None, discover: Discover | None = None) -> None:  # fmt: skip
        self.config = config
        self.config_path = config_path  # for POST /admin/reload and the file watch
        self.settings = config.gateway
        self.pool = EndpointPool(endpoints if endpoints is not None else config.build_endpoints(),
                                 config.gateway.health())  # fmt: skip
        self.profile = config.build_profile()
        self.metrics = GatewayMetrics(self.pool, self.profile, config.governance.metrics_max_tenants)
        self.pool.on_eject.append(self.profile.on_eject)
        self.pool.on_eject.append(lambda ep: self.metrics.ejections.labels(ep.name).inc())
        self.session: aiohttp.ClientSession | None = None
        self._created = int(time.time())
        self.semantic: SemanticRouter | None = None  # built at startup: loading the encoder takes seconds
        self.chains: OrderedDict[str, tuple[str, str]] = OrderedDict()  # response id -> (session, endpoint)
        self._watch: asyncio.Task | None = None
        self.discover = discover or config.build_discovery()  # replicas on Ray, or names in DNS
        self._discovery: asyncio.Task | None = None
        self.pool.on_leave.append(self.profile.on_eject)  # a replica gone for good: forget its cached prefixes
        g = config.governance
        self.governance = Governance(config.db, self.settings.api_key, g.sync_interval_s, g.auth_failures_per_minute,
                                     Limits(session_requests=g.session_max_requests,
                                            session_tokens=g.session_max_tokens))  # fmt: skip
        f = config.fairness
        self.queue = FairQueue(self._capacity, f.slots_per_endpoint, f.max_queue, f.max_wait_s, f.interactive_reserve,
                               self.governance.weight) if f.enabled else None  # fmt: skip
        self.dashboard = Dashboard(self, config.dashboard) if config.dashboard.enabled else None
        self.live = self.dashboard.live if self.dashboard is not None else None
        self.pipeline = Pipeline(pipeline_stages(self), self._forward)
        self._tarpits = 0
        self._in_flight: dict[asyncio.Task, RequestContext] = {}  # proxied requests, for end_requests

    # -- lifecycle -------------------------------------------------------------------

    async def startup(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await self.governance.start()
        if self.discover is not None:
            await self._discover_once()
            self._discovery = asyncio.create_task(self._discover_loop())
        await self.pool.start(self.session)
        if self.config.semantic is not None:
            self.semantic = await asyncio.to_thread(SemanticRouter, self.config.semantic)
            if self.config.semantic.watch_interval_s > 0 and self.config_path:
                self._watch = asyncio.create_task(self._watch_config(self.config.semantic.watch_interval_s))
        names = ", ".join(f"{ep.name}{'' if ep.healthy else ' (not ready)'}" for ep in self.pool)
        logger.info("gateway profile %s over %d endpoints: %s", self.profile.name, len(self.pool.endpoints), names)

    def closing(self) -> None:
        """The server was asked to stop (a signal handler, any thread): end the long-lived dashboard feeds."""
        if self.dashboard is not None:
            self.dashboard.close()

    def end_requests(self) -> None:
        """The shutdown's drain ran out (on the event loop): every proxied request still running ends now, in its
        API's shape: a stream with an error event after what it already sent, a request not yet answered
        (queued, or waiting on its endpoint) with a 503. Closing the upstream connection aborts its work."""
        for task, ctx in list(self._in_flight.items()):
            ctx.ended_by_shutdown = True
            if not ctx.responded:
                ctx.status = 503
            task.cancel()

    async def _discover_once(self) -> None:
        assert self.discover is not None
        try:
            found = await self.discover()
        except Exception as exc:  # noqa: BLE001 - keep routing over what we know; the next pass may work
            logger.warning("endpoint discovery failed, keeping %d endpoints: %s", len(self.pool.endpoints), exc)
            return
        joined, _ = self.pool.update(found)
        if joined and self.session is not None and self.pool._session is not None:
            await asyncio.gather(*(self.pool.check(ep) for ep in joined))  # in rotation at once, not next scrape

    async def _discover_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval_s)
            await self._discover_once()

    async def shutdown(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        if self._watch is not None:
            self._watch.cancel()
        try:
            await self.pool.stop()
            await self.governance.stop()
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
        send = _Send(send)
        try:
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > self.settings.max_header_bytes:
                raise APIError(431, f"the request headers take {size} bytes; the limit is "
                                    f"{self.settings.max_header_bytes}", code="request_header_fields_too_large")  # fmt: skip
            await self._route(scope, receive, send)
        except APIError as exc:
            if exc.status != 401:
                self.metrics.rejected.labels(str(exc.status)).inc()
            await self._send_error(scope, send, exc)
        except _ClientGone:
            self.metrics.disconnects.inc()
        except Exception:
            logger.exception("gateway error on %s %s", scope.get("method"), scope.get("path", "")[:200])
            await self._send_error(scope, send, APIError(500, "internal gateway error", "internal_error"))

    async def _send_error(self, scope: dict[str, Any], send: _Send, exc: APIError) -> None:
        """The error in its API's shape; once an answer has begun, nothing can be said over it."""
        if send.started:
            logger.warning("%s %s: an error after the answer began: %s", scope.get("method"),
                           scope.get("path", "")[:200], exc.message)  # fmt: skip
            return
        if scope["path"].startswith("/v1/messages"):  # Anthropic's API: Anthropic's error shape
            status, body = anthropic_error(exc)
            await send_json(send, status, body, exc.headers)
        else:
            await send_json(send, exc.status, exc.body(), exc.headers)

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
        client = _client(scope)
        if method == "POST" and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")) and \
                path != "/v1/classify" and not path.startswith("/v1/responses/"):  # fmt: skip
            await self._proxy(scope, headers, receive, send)
        elif path.startswith("/admin/"):
            self.require_admin(await self.identify(headers, client), client, "the admin API")
            if method == "POST" and path == "/admin/reload":
                await send_json(send, 200, await self.reload())
                return
            body = await self.read_body(headers, receive) if method in ("POST", "PUT", "PATCH") else b""
            status, payload, extra = await admin.handle(self, method, path, scope.get("query_string", b""), body)
            await send_json(send, status, payload, extra)
        elif path == "/dashboard" or path.startswith("/dashboard/"):
            if self.dashboard is None:
                raise APIError(404, "the dashboard is off (dashboard.enabled: false)", "not_found_error")
            await self.dashboard.handle(scope, headers, client, send, receive)
        elif method == "POST" and path == "/v1/classify":
            await self.identify(headers, client)
            await self._classify(headers, receive, send)
        elif method in ("GET", "DELETE", "POST") and path.startswith("/v1/responses/"):  # POST: .../cancel
            identity = await self.identify(headers, client)
            await self._stored(scope, headers, identity, send)
        elif method == "GET" and path == "/health":
            ok = any(ep.available(time.monotonic()) for ep in self.pool)
            if not ok:
                raise APIError(503, "no healthy endpoint", "service_unavailable", code="no_healthy_endpoint")
            await send_json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/metrics":
            await send_body(send, 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")
        elif method == "GET" and path == "/version":
            await send_json(send, 200, {"version": agora.__version__})
        elif method == "GET" and path == "/v1/models":
            identity = await self.identify(headers, client)
            models = [m for m in self._models() if identity.may_use(m)]
            await send_json(send, 200, {"object": "list", "data": [self._card(m) for m in models]})
        elif method == "GET" and path.startswith("/v1/models/"):
            identity = await self.identify(headers, client)
            model = path.removeprefix("/v1/models/")
            if model not in self._models() or not identity.may_use(model):
                raise APIError(
                    404, f"the model {model!r} does not exist", "not_found_error", "model", "model_not_found"
                )
            await send_json(send, 200, self._card(model))
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
        """A model's card; with ``max_model_len`` (vLLM's field, which clients size prompts by) when its
        endpoints say it: the smallest, since a request may go to any of them."""
        card: dict[str, Any] = {"id": model, "object": "model", "created": self._created, "owned_by": "agora"}
        lengths = [ep.max_model_len[model] for ep in self.pool if model in ep.max_model_len]
        if lengths:
            card["max_model_len"] = min(lengths)
        return card

    async def identify(self, headers: dict[bytes, bytes], client: str, ctx: RequestContext | None = None) -> Identity:
        """The caller (``Authorization: Bearer KEY`` or Anthropic's ``x-api-key: KEY``), or a 401. A client
        that keeps sending wrong keys is held back a second and refused with a 429; valid keys never wait."""
        try:
            return self.governance.identify(_credential(headers), client)
        except APIError as exc:
            if exc.status != 401:
                raise
            refusal = self.governance.throttled(client)  # this client's wrong keys so far
            self.governance.failed(client)
            if refusal is None:
                raise
            if ctx is not None:
                ctx.reason = "auth_throttled"
            self.metrics.auth_throttled.inc()
            if self._tarpits < _MAX_TARPITS:
                self._tarpits += 1
                try:
                    await asyncio.sleep(1.0)
                finally:
                    self._tarpits -= 1
            raise refusal from None

    def require_admin(self, identity: Identity, client: str, what: str) -> None:
        """An admin key; or, on a gateway with no keys at all, a client on this machine (else a 403)."""
        if identity.role != "admin" or (self.governance.open and not is_loopback(client)):
            raise APIError(403, f"{what} needs an admin key" + (
                " (or, with no keys configured, a client on this machine)" if self.governance.open else ""),
                "permission_error", code="admin_only")  # fmt: skip

    def alias(self, model: str) -> str:
        """The served model an alias (a name or a glob) stands for; the name itself otherwise."""
        aliases = self.config.model_aliases
        if model in aliases:
            return aliases[model]
        return next((target for pattern, target in aliases.items() if fnmatch.fnmatchcase(model, pattern)), model)

    def _capacity(self, model: str | None) -> int:
        """Endpoints that serve ``model`` and can be picked now (the fair queue's slots)."""
        now = time.monotonic()
        return sum(1 for ep in self.pool if ep.serves(model) and ep.available(now))

    def _upstream_headers(self, headers: dict[bytes, bytes], identity: Identity | None,
                          band: str | None = None) -> dict[str, str]:  # fmt: skip
        """What reaches the endpoints: a few client headers, the client's key (only on an open gateway), the
        tenant (its cache scope, the engines' prefix-cache salt), the owner of stored responses (the key) and
        the request's priority band (engines that schedule by priority serve a band before the next), which
        endpoints trust from the gateway."""
        out = {k.decode(): v.decode("latin-1") for k, v in headers.items() if k in _FORWARD_REQUEST}
        if self.governance.open:
            for name in (b"authorization", b"x-api-key"):
                if name in headers:
                    out[name.decode()] = headers[name].decode("latin-1")
        if identity is not None:
            out["x-agora-tenant"] = identity.scope
            out["x-agora-owner"] = identity.owner
            if band is not None:
                out["x-agora-priority"] = band
        return out

    # -- proxying ----------------------------------------------------------------------

    async def read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
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
        path = scope["path"]
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"gw-{uuid.uuid4().hex}"
        ctx = RequestContext(scope, headers, receive, send, path, api_of(path), _client(scope), rid)
        task = asyncio.current_task()
        assert task is not None
        self._in_flight[task] = ctx
        try:
            await self.pipeline.run(ctx)
        except asyncio.CancelledError:
            if ctx.client_gone:
                self.metrics.disconnects.inc()
            elif ctx.ended_by_shutdown and not ctx.responded:
                raise APIError(503, _SHUTTING_DOWN, "service_unavailable", code="shutting_down") from None
            else:
                raise
        finally:
            del self._in_flight[task]
            if ctx.watcher is not None:
                ctx.watcher.cancel()

    async def _forward(self, ctx: RequestContext) -> None:
        """The pipeline's last step: pick an endpoint and relay its answer (retrying before the first byte)."""
        data = ctx.data
        session = ctx.session
        if session is None and ctx.path == "/v1/responses":
            # A Responses chain is one session: its turns stay on the replica that holds its prefix.
            previous = data.get("previous_response_id")
            known = self.chains.get(previous) if isinstance(previous, str) else None
            session = known[0] if known is not None else f"chain-{uuid.uuid4().hex}"
        ctx.info = req = RequestInfo.from_body(ctx.path, data, session)
        upstream_headers = self._upstream_headers(ctx.headers, ctx.identity, ctx.band)
        query = ctx.scope.get("query_string")
        path = ctx.path + (f"?{query.decode('latin-1')}" if query else "")
        await self._exchange(ctx, req, path, upstream_headers)

    async def _exchange(self, ctx: RequestContext, req: RequestInfo, path: str, headers: dict[str, str]) -> None:
        assert self.session is not None
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        limit = s.max_in_flight_per_endpoint if self.queue is None else self.config.fairness.slots_per_endpoint
        body = ctx.encoded()
        tried: list[str] = []
        last: tuple[int, bytes, dict[str, str]] | None = None  # the last retriable answer, if we run out
        for attempt in range(s.retries + 1):
            t = time.perf_counter()
            try:
                candidates = admit(self.pool, req.model, limit, tried)
            except APIError:
                if last is None:
                    raise
                break  # nowhere left to retry: give the client the last upstream answer
            decision = self.profile.pick(req, candidates)
            self.metrics.pick_seconds.observe(time.perf_counter() - t)
            ep = ctx.endpoint = decision.endpoint
            ctx.decision = decision
            if self.live is not None:
                self.live.routed(ctx, decision, attempt)
            if attempt == 0 and "prefix_blocks" in req.notes:
                self.metrics.prefix(ep.name, *req.notes["prefix_blocks"])
            send_headers = dict(headers)
            if ep.api_key:
                send_headers["authorization"] = f"Bearer {ep.api_key}"
            ep.in_flight += 1
            try:
                try:
                    resp = await self.session.post(ep.url + path, data=body, headers=send_headers,
                                                   timeout=timeout)  # fmt: skip
                except (TimeoutError, aiohttp.ClientError) as exc:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
                    self.metrics.errors.labels(ep.name, kind).inc()
                    self.pool.record_failure(ep, f"{kind}: {type(exc).__name__}: {exc}")
                    last = (502, _upstream_failed(ep.name, kind), {})
                else:
                    if resp.status >= 500 or resp.status == 429:
                        try:
                            payload = await resp.read()
                        except (TimeoutError, aiohttp.ClientError):  # the error's body broke off too: still retriable
                            payload = _upstream_failed(ep.name, f"HTTP {resp.status}")
                        resp.release()
                        if resp.status >= 500:
                            self.metrics.errors.labels(ep.name, "status_5xx").inc()
                            self.pool.record_failure(ep, f"HTTP {resp.status}")
                        last = (resp.status, payload, _response_headers(resp))
                    else:
                        self.pool.record_success(ep)
                        await self._relay(resp, ep, ctx, req.session)
                        return
            finally:
                ep.in_flight -= 1
            tried.append(ep.name)
            if attempt < s.retries:
                self.metrics.retries.labels(ep.name).inc()
                if self.live is not None:
                    self.live.retried()
        assert last is not None
        status, payload, last_extra = last
        ctx.status, ctx.reason = status, "upstream_error"
        self.metrics.requests.labels(tried[-1], str(status)).inc()
        await send_body(ctx.send, status, payload, last_extra.pop("content-type", "application/json").encode(),
                    {**ctx.to_client, **last_extra, "x-agora-endpoint": tried[-1]})  # fmt: skip
        ctx.complete = True

    async def _relay(self, resp: aiohttp.ClientResponse, ep: Endpoint, ctx: RequestContext,
                     session: str | None = None) -> None:  # fmt: skip
        """Stream the upstream answer to the client as it comes; close upstream if we stop early.

        An event stream is passed on event by event through the usage meter (which may hold back the
        usage chunk the gateway asked for); with a cache ticket the answer is also kept (up to
        ``_MAX_CACHED_BYTES``) for the cache stage to store once complete.
        """
        send, meter = ctx.send, ctx.meter
        ctx.status = resp.status
        ctx.prompt_tokens_header = resp.headers.get("x-agora-prompt-tokens")
        headers = {**ctx.to_client, **_response_headers(resp)}
        response_id = resp.headers.get("x-agora-response-id")
        if response_id:  # the next turn of this chain (previous_response_id) goes where its prefix is
            self.chains[response_id] = (session or response_id, ep.name)
            while len(self.chains) > _MAX_CHAINS:
                self.chains.popitem(last=False)
        content_type = headers.pop("content-type", "application/json")
        ctx.content_type = content_type
        headers["x-agora-endpoint"] = ep.name
        headers["x-agora-scores"] = ctx.decision.explain() if ctx.decision is not None else ""
        raw = [(b"content-type", content_type.encode("latin-1"))]
        raw += [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
        complete = False
        # OpenAI's clients stop reading at an event stream's `data: [DONE]` and close at once, while
        # the backend may end its body a moment later: the answer is whole at [DONE], so the relay
        # ends there instead of waiting for the body's end and seeing a client that went away.
        splitter = EventSplitter() if content_type.startswith("text/event-stream") else None
        # What is kept of the answer: a stream's events for the cache; a JSON body for the meter and the cache.
        cache = ctx.cache_ticket is not None and resp.status == 200
        limit = _MAX_CACHED_BYTES if splitter is not None or meter is None else _MAX_METERED_BYTES
        kept = _Bounded(limit) if cache or (splitter is None and meter is not None) else None
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": raw})
            try:
                async for chunk in resp.content.iter_any():
                    if ctx.first_byte is None:
                        ctx.first_byte = time.perf_counter()
                    done = False
                    if splitter is not None:
                        events = splitter.feed(chunk)
                        out = b"".join(e for e in events if meter is None or meter.event(e))
                        done = bool(events) and events[-1].strip() == b"data: [DONE]"
                        if kept is not None:
                            kept.add(b"".join(events))  # as the endpoint sent them: the cache wants the usage
                    else:
                        out = chunk
                        if kept is not None:
                            kept.add(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if done:
                        break
                if splitter is not None and (rest := splitter.rest()):
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except asyncio.CancelledError:
                if not ctx.ended_by_shutdown or ctx.client_gone or splitter is None:
                    raise  # a whole body cut short stays broken: the client must not take it for complete
                event = stream_error(api_of(ctx.path), _SHUTTING_DOWN, "shutting_down", _next_sequence(meter))
                await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
                return
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Bytes already went out: no retry. An event stream ends with an error event in its API's
                # shape (the SDKs raise it); any other body ends without a final chunk, so that the client
                # sees a broken response, not a short one that looks complete.
                self.metrics.errors.labels(ep.name, "stream").inc()
                self.pool.record_failure(ep, f"stream broke: {type(exc).__name__}")
                logger.warning("endpoint %s broke off a response: %s", ep.name, exc)
                ctx.reason = "upstream_broke"
                if splitter is not None:
                    event = stream_error(api_of(ctx.path), f"the model server {ep.name} stopped mid-answer; "
                                         "retry the request", sequence_number=_next_sequence(meter))  # fmt: skip
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = ctx.complete = True
            self.metrics.requests.labels(ep.name, str(resp.status)).inc()
            answer = kept.value() if kept is not None else None
            if answer is not None and splitter is None and meter is not None:
                meter.body(answer)
            if answer is not None and cache and len(answer) <= _MAX_CACHED_BYTES:
                ctx.kept = answer
        finally:
            ctx.finished = time.perf_counter()
            if complete:
                resp.release()
            else:
                resp.close()  # drop the connection: the backend sees the client gone and aborts

    def store_answer(self, ticket: tuple, payload: bytes, content_type: str) -> None:
        store, key, embedding = ticket
        if content_type.startswith("text/event-stream"):
            answer = answer_from_sse(payload, key.kind)
        else:
            answer = answer_from_json(payload, key.kind)
        if answer is not None and _ran_to_an_end(answer):
            store.store(key, answer, embedding)
            self.metrics.cache.labels("store").inc()

    async def send_cached(self, ctx: RequestContext, answer: Answer, headers: dict[str, str]) -> None:
        await _send_cached(ctx.send, answer, ctx.data, headers)

    async def _stored(self, scope: dict[str, Any], headers: dict[bytes, bytes], identity: Identity,
                      send: Any) -> None:  # fmt: skip
        """GET / DELETE of a stored response (and POST .../cancel): first where the chain was last served, then
        elsewhere (the replicas of one machine share one store; separate machines each hold their own)."""
        assert self.session is not None
        rid = scope["path"].removeprefix("/v1/responses/").split("/", 1)[0]
        known = self.chains.get(rid)
        now = time.monotonic()
        candidates = sorted((ep for ep in self.pool if ep.available(now)), key=lambda ep: known is None or
                            ep.name != known[1])  # fmt: skip
        if not candidates:
            raise APIError(503, "no healthy endpoint", "service_unavailable", code="no_healthy_endpoint")
        upstream = self._upstream_headers(headers, identity)
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
        await send_body(send, status, payload, extra.pop("content-type", "application/json").encode(), extra)

    # -- semantic routing: classify, reload -----------------------------------------------

    async def _classify(self, headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
        if self.semantic is None:
            raise APIError(404, "semantic routing is not configured (no semantic: section)", "not_found_error")
        data = json_object(await self.read_body(headers, receive), headers.get(b"content-type"))
        semantic = self.semantic
        await send_json(send, 200, await asyncio.to_thread(semantic.classify, data))

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


class _Bounded:
    """Bytes kept up to ``limit``; past it nothing is (a part of an answer is no answer)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.parts: list[bytes] | None = []

    def add(self, data: bytes) -> None:
        if self.parts is None or not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.parts = None
        else:
            self.parts.append(data)

    def value(self) -> bytes | None:
        return b"".join(self.parts) if self.parts is not None else None


async def _send_cached(send: Any, answer: Answer, body: dict[str, Any], headers: dict[str, str]) -> None:
    """A cache hit as the client asked for it: one JSON body, or a replayed stream (with usage if asked)."""
    if body.get("stream") is not True:
        await send_body(send, 200, replay_json(answer), b"application/json", headers)
        return
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = bool(options.get("include_usage") or options.get("continuous_usage_stats"))
    raw = [(b"content-type", b"text/event-stream")] + [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    for chunk in replay_sse(answer, include_usage):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _upstream_failed(endpoint: str, what: str) -> bytes:
    """The error body a client gets when an endpoint failed and no other one answered."""
    return json.dumps(error_body(f"endpoint {endpoint} failed: {what}", "bad_gateway", code="upstream_error")).encode()


def _ran_to_an_end(answer: Answer) -> bool:
    if isinstance(answer, Reply):
        return answer.stop_reason in ("end_turn", "max_tokens", "stop_sequence", "tool_use")
    return all(c.finish_reason in _CACHEABLE_FINISH for c in answer.choices)


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _credential(headers: dict[bytes, bytes]) -> str:
    """The client's key as an ``Authorization`` value (Anthropic clients send ``x-api-key``)."""
    given = headers.get(b"authorization", b"").decode("latin-1")
    if not given and b"x-api-key" in headers:
        given = "Bearer " + headers[b"x-api-key"].decode("latin-1")
    return given


def _response_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: resp.headers[k] for k in _FORWARD_RESPONSE if k in resp.headers}
