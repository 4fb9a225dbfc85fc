"""The gateway's pipeline stages (see ``pipeline.py``), in the order they run.

Each one is small and reads the gateway for what it shares (settings, governance,
semantic router, metrics); none calls another.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from agora.openai.common import json_object, lone_surrogate, surrogate_error
from agora.openai.errors import APIError
from agora.router.governance.audit import new_record
from agora.router.governance.meter import UsageMeter
from agora.router.pipeline import RequestContext, Stage
from agora.router.request import chat_prompt_text, conversation

if TYPE_CHECKING:
    from agora.router.gateway import Gateway

_SEMANTIC_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_MAX_TARPITS = 256  # clients held back at once for sending wrong keys
_MAX_CONTENT = 64 << 10  # prompt text kept in an audit record with content


class AuditStage(Stage):
    """First in, last out: one record per request, whatever happened to it (and the dashboard's count)."""

    name = "audit"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def after(self, ctx: RequestContext) -> None:
        gov = self.gw.governance
        tokens_in, tokens_out = ctx.tokens()
        ident = ctx.identity
        tenant = ident.tenant if ident is not None else None
        self.gw.metrics.tenant(tenant, ctx, tokens_in, tokens_out)
        live = self.gw.live
        if live is not None:
            live.request(ctx, tokens_out)
        if gov is None or not self.gw.config.audit.enabled or ctx.reason == "auth_throttled":
            return  # a flood of wrong keys is counted in the metrics, not written down one by one
        routed = ctx.data.get("model") if isinstance(ctx.data.get("model"), str) else None
        record = new_record(
            time=round(ctx.time, 6), request_id=ctx.request_id, tenant=tenant,
            key_id=ident.key_id if ident is not None else None, session=ctx.session, api=ctx.api, path=ctx.path,
            model_requested=ctx.model_requested, model_served=routed if ctx.endpoint is not None else None,
            endpoint=ctx.endpoint.name if ctx.endpoint is not None else None,
            routing=ctx.decision.explain() if ctx.decision is not None else None,
            semantic_decision=ctx.semantic.decision if ctx.semantic is not None else None, priority=ctx.band,
            status=ctx.status, tokens_in=tokens_in, tokens_out=tokens_out,
            ttft_ms=_ms(ctx.first_token, ctx.started), latency_ms=_ms(ctx.finished, ctx.started),
            queue_ms=round(ctx.slot.waited * 1000, 3) if ctx.slot is not None else None, reason=ctx.reason,
            flags=list(ctx.semantic.flags) if ctx.semantic is not None and ctx.semantic.flags else None,
        )  # fmt: skip
        if self.gw.config.audit.include_content:
            turns = conversation(ctx.path, ctx.data)
            prompt = chat_prompt_text(turns) if turns is not None else ctx.data.get("prompt")
            record["prompt"] = (prompt if isinstance(prompt, str) else json.dumps(prompt))[:_MAX_CONTENT]
            record["completion"] = ctx.meter.completion_text() if ctx.meter is not None else None
        gov.record(record)
        if live is not None:
            live.audited(record)


class IdentifyStage(Stage):
    """Who is asking (401, or 429 for a client that keeps sending wrong keys). Before any body is read."""

    name = "identify"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        ctx.identity = await self.gw.identify(ctx.headers, ctx.client, ctx)


class AdmitStage(Stage):
    """The body (413, 400), the model (aliases; 403 for a model the key may not use), session and band."""

    name = "admit"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        gw = self.gw
        ctx.body = await gw.read_body(ctx.headers, ctx.receive)
        ctx.watch_disconnect()
        data = json_object(ctx.body, ctx.headers.get(b"content-type"))
        if (where := lone_surrogate(ctx.body, data)) is not None:  # not text: no stage and no model could read it
            raise surrogate_error(where)
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "model must be a string", param="model")
        ctx.model_requested = model
        if isinstance(model, str) and gw.alias(model) != model:
            data["model"] = gw.alias(model)
            ctx.changed()
        ctx.data = data
        ident = ctx.identity
        if ident is not None and not (ident.may_use(model) or ident.may_use(data.get("model"))):
            raise _not_allowed(model)
        header = ctx.headers.get(gw.settings.session_header.lower().encode())
        ctx.session = header.decode("latin-1") if header else None
        asked = ctx.headers.get(b"x-agora-priority")
        if ident is not None:
            ctx.band = ident.band(asked.decode("latin-1").strip().lower() if asked else None)


class LimitsStage(Stage):
    """Reserve on every limit of the key, the tenant and the session (429); settle with what was used."""

    name = "limits"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        gov, ident = self.gw.governance, ctx.identity
        generates = ctx.path in _SEMANTIC_PATHS
        ctx.estimate_in = len(ctx.body) // 4 if generates else 0
        asked = next((ctx.data[f] for f in _MAX_TOKEN_FIELDS if isinstance(ctx.data.get(f), int)), None)
        out = asked if asked is not None and asked > 0 else self.gw.config.governance.default_reserve_tokens
        ctx.reserved = ctx.estimate_in + (out if generates else 0)
        self._ask_for_usage(ctx)
        ctx.meter = UsageMeter(ctx.api, ctx.hide_usage, self.gw.config.audit.include_content)
        if gov is None or ident is None:
            return
        subjects = ident.subjects()
        session_limits = ident.session_limits(gov.session_defaults)
        session = (ident.scope, ctx.session) if ctx.session else None
        if subjects or session is not None:
            ctx.reservation = gov.limiter.admit(subjects, ctx.reserved, session, session_limits, ctx.estimate_in)

    def _ask_for_usage(self, ctx: RequestContext) -> None:
        """A chat or completions stream reports its tokens only when asked: ask, and hide the answer
        from a client that did not."""
        if ctx.api not in ("chat", "completions") or ctx.data.get("stream") is not True:
            return
        options = ctx.data.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return  # the endpoint will refuse it: nothing to count
        if isinstance(options, dict) and options.get("include_usage") is True:
            return
        ctx.data["stream_options"] = {**(options or {}), "include_usage": True}
        ctx.changed()
        ctx.hide_usage = True

    def after(self, ctx: RequestContext) -> None:
        if ctx.reservation is not None:
            tokens_in, tokens_out = ctx.tokens()
            ctx.reservation.settle(tokens_in + tokens_out)


class SemanticStage(Stage):
    """Signals and decision: 403 for a guard, a rewritten body, a model picked for ``auto``."""

    name = "semantic"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        semantic = self.gw.semantic
        if semantic is None or ctx.path not in _SEMANTIC_PATHS:
            return
        m = self.gw.metrics
        t = time.perf_counter()
        scope = ctx.identity.scope if ctx.identity is not None else ""
        outcome = await asyncio.to_thread(semantic.process, ctx.path, ctx.data, scope)
        ctx.semantic = outcome
        m.classify_seconds.observe(time.perf_counter() - t)
        m.decisions.labels(outcome.decision).inc()
        for kind in {s.type for s in outcome.signals.pii}:
            m.pii_found.labels(kind).inc()
        if outcome.error is not None:
            if outcome.error.status == 403:
                m.blocked.labels(outcome.error.code or "blocked").inc()
            ctx.reason = outcome.error.code or "blocked"
            raise outcome.error
        ctx.to_client.update(outcome.headers)
        if outcome.body is not ctx.data:
            ctx.data = outcome.body
            ctx.changed()
            routed = ctx.data.get("model")
            if ctx.identity is not None and isinstance(routed, str) and not ctx.identity.may_use(routed):
                raise _not_allowed(routed)


class CacheStage(Stage):
    """A semantic-cache hit answers here; a miss that completes is stored on the way back."""

    name = "cache"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        semantic, outcome = self.gw.semantic, ctx.semantic
        if semantic is None or semantic.cache is None or outcome is None:
            return
        m = self.gw.metrics
        if outcome.cache_key is None:
            m.cache.labels("bypass").inc()
        elif outcome.cached is not None:
            answer, kind = outcome.cached
            m.cache.labels(f"hit_{kind}").inc()
            await self.gw.send_cached(ctx, answer, {**ctx.to_client, "x-agora-cache": f"hit-{kind}"})
            ctx.answered, ctx.status, ctx.complete = True, 200, True
            ctx.meter = None  # nothing was generated: nothing to charge
        else:
            m.cache.labels("miss").inc()
            ctx.cache_ticket = (semantic.cache, outcome.cache_key, outcome.embedding)

    def after(self, ctx: RequestContext) -> None:
        if ctx.cache_ticket is not None and ctx.complete and ctx.status == 200 and ctx.kept is not None:
            self.gw.store_answer(ctx.cache_ticket, ctx.kept, ctx.content_type)


class QueueStage(Stage):
    """Fair queueing while the endpoints are saturated (when ``fairness.enabled``)."""

    name = "queue"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def before(self, ctx: RequestContext) -> None:
        queue = self.gw.queue
        if queue is None:
            return
        tenant = ctx.identity.tenant or ctx.identity.scope if ctx.identity is not None else ""
        ctx.slot = await queue.acquire(ctx.data.get("model"), tenant, ctx.band)
        self.gw.metrics.queue_seconds.observe(ctx.slot.waited)

    def after(self, ctx: RequestContext) -> None:
        if ctx.slot is not None:
            ctx.slot.release()


class FeedbackStage(Stage):
    """Last in, first out: the profile's plugins hear how the request they routed went."""

    name = "feedback"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def after(self, ctx: RequestContext) -> None:
        if ctx.info is not None and ctx.endpoint is not None:
            self.gw.profile.on_done(ctx.info, ctx.endpoint, ctx.status or 0)


def _not_allowed(model: Any) -> APIError:
    return APIError(403, f"this API key may not use the model {model!r}", "permission_error", "model",
                    "model_not_allowed")  # fmt: skip


def _ms(end: float | None, start: float) -> float | None:
    return round((end - start) * 1000, 3) if end is not None else None


def pipeline_stages(gw: Gateway) -> list[Stage]:
    return [AuditStage(gw), IdentifyStage(gw), AdmitStage(gw), LimitsStage(gw), SemanticStage(gw),
            CacheStage(gw), QueueStage(gw), FeedbackStage(gw)]  # fmt: skip
