"""What the dashboard shows: the gateway's recent history, kept cheaply as requests pass.

Recording is O(1) per request (a counter in the current second's bucket, a bounded
sample list, a ring of recent events); the snapshot (a JSON-ready dict) is built only
when someone watches. Counts that ``/metrics`` also exports (requests per endpoint,
decisions, tenants' tokens) are read from the very same Prometheus counters, so the
page and ``/metrics`` never disagree.

::

    pipeline ─ request done ─▶ LiveStats.request()  ┐
    _exchange ─ pick ───────▶ LiveStats.routed()    ├─ buckets (1 s, last window_s) + rings
    audit stage ─ record ───▶ LiveStats.audited()   ┘
                                   │ snapshot(gateway), once per tick, only with subscribers
                                   ▼
                         /dashboard/events (SSE), /dashboard/snapshot, agora top
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import Counter

from agora.router.governance.limits import key_subject, tenant_subject
from agora.router.governance.store import KeyRecord

if TYPE_CHECKING:
    from agora.router.gateway import Gateway
    from agora.router.pipeline import RequestContext
    from agora.router.profile import Decision

_SAMPLES_PER_SECOND = 256  # latency samples kept per one-second bucket (a uniform sample past it)
_LATENCY_STEP_S = 10  # latency percentiles over time: one point per this many seconds
_RECENT = 50  # routing decisions, semantic events and audit records kept
_SUMMARY_S = 60  # the latency summary covers the last minute


@dataclass(slots=True)
class _Second:
    """One second of traffic."""

    t: int
    requests: int = 0
    errors: int = 0  # 5xx, and answers an endpoint broke off
    rejected: int = 0  # refused by the gateway or an endpoint with a 4xx
    retries: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds
    itl: list[float] = field(default_factory=list)  # seconds per token after the first, per request
    seen_ttft: int = 0
    seen_itl: int = 0


def _keep(samples: list[float], seen: int, value: float, rng: random.Random) -> None:
    """Reservoir sampling: a uniform sample of at most ``_SAMPLES_PER_SECOND`` values."""
    if len(samples) < _SAMPLES_PER_SECOND:
        samples.append(value)
        return
    j = rng.randrange(seen)
    if j < _SAMPLES_PER_SECOND:
        samples[j] = value


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (0 < q <= 100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


class LiveStats:
    """The last ``window_s`` seconds of traffic, plus the latest events of each kind."""

    def __init__(self, window_s: int = 300) -> None:
        self.window_s = window_s
        self.seconds: deque[_Second] = deque(maxlen=window_s)
        self.routing: deque[tuple[float, str, str | None, Decision, int]] = deque(maxlen=_RECENT)
        self.semantic: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self.audit: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self.started = time.time()
        self._rng = random.Random(0)

    def _now(self, now: float | None = None) -> _Second:
        t = int(now if now is not None else time.time())
        if not self.seconds or self.seconds[-1].t < t:
            self.seconds.append(_Second(t))
        return self.seconds[-1]

    # -- recording (the request path) ---------------------------------------------------

    def request(self, ctx: RequestContext, tokens_out: int) -> None:
        """One request that went through the pipeline, whatever its outcome (``tokens_out``: what it generated)."""
        s = self._now()
        s.requests += 1
        status = ctx.status or 0
        if status >= 500 or ctx.reason == "upstream_broke":
            s.errors += 1
        elif 400 <= status < 500 and status != 499:
            s.rejected += 1
        streamed = ctx.content_type.startswith("text/event-stream")
        first = ctx.first_token
        if ctx.endpoint is not None and first is not None and status == 200 and streamed:
            # TTFT and inter-token latency as vLLM's bench defines them: of streamed answers only (a whole
            # JSON body's first byte is its last), from the first content delta on. Per request: the mean
            # gap between its later tokens.
            s.seen_ttft += 1
            _keep(s.ttft, s.seen_ttft, first - ctx.started, self._rng)
            if ctx.finished is not None and tokens_out > 1:
                s.seen_itl += 1
                _keep(s.itl, s.seen_itl, (ctx.finished - first) / (tokens_out - 1), self._rng)
        outcome = ctx.semantic
        if outcome is not None:
            error = outcome.error
            jailbreak, injection = outcome.signals.jailbreak, outcome.signals.injection
            self.semantic.append({
                "time": round(ctx.time, 3), "request_id": ctx.request_id, "decision": outcome.decision,
                "model": ctx.data.get("model") if isinstance(ctx.data.get("model"), str) else None,
                "blocked": (error.code or "blocked") if error is not None else None,
                "pii": sorted({p.type for p in outcome.signals.pii}),
                "jailbreak": round(jailbreak.score, 3) if jailbreak is not None else None,
                "injection": round(injection.score, 3) if injection is not None else None,
                "flags": list(outcome.flags),
                "cache": f"hit_{outcome.cached[1]}" if outcome.cached is not None else
                         ("miss" if outcome.cache_key is not None else None),
            })  # fmt: skip

    def retried(self) -> None:
        self._now().retries += 1

    def routed(self, ctx: RequestContext, decision: Decision, attempt: int) -> None:
        """A pick, kept as it is (the decision's own dicts) and formatted only when a snapshot shows it."""
        model = ctx.info.model if ctx.info is not None else None
        self.routing.append((time.time(), ctx.request_id, model, decision, attempt))

    def audited(self, record: dict[str, Any]) -> None:
        self.audit.append(record)

    def _routing(self) -> list[dict[str, Any]]:
        out = []
        for at, request_id, model, decision, attempt in reversed(self.routing):
            candidates = [{"endpoint": name, "total": round(total, 4),
                           "scores": {scorer: round(values[i], 4) for scorer, values in decision.per_scorer.items()}}
                          for i, (name, total) in enumerate(decision.totals.items())]  # fmt: skip
            candidates.sort(key=lambda c: -c["total"])
            out.append({"time": round(at, 3), "request_id": request_id, "model": model,
                        "endpoint": decision.endpoint.name, "attempt": attempt, "candidates": candidates,
                        "considered": len(candidates)})  # fmt: skip
        return out

    # -- reading (only while someone watches) ---------------------------------------------

    def series(self, now: float | None = None) -> dict[str, Any]:
        """Per-second counts over the window, oldest first, zeros where nothing happened."""
        end = int(now if now is not None else time.time())
        start = end - self.window_s + 1
        names = ("requests", "errors", "rejected", "retries")
        out: dict[str, Any] = {"start": start, "step_s": 1, **{n: [0] * self.window_s for n in names}}
        for s in self.seconds:
            i = s.t - start
            if 0 <= i < self.window_s:
                for n in names:
                    out[n][i] = getattr(s, n)
        return out

    def latency(self, now: float | None = None) -> dict[str, Any]:
        """TTFT and inter-token latency percentiles (ms) per ``_LATENCY_STEP_S``, and over the last minute."""
        end = int(now if now is not None else time.time())
        points = self.window_s // _LATENCY_STEP_S
        start = end - points * _LATENCY_STEP_S + 1
        groups: list[tuple[list[float], list[float]]] = [([], []) for _ in range(points)]
        recent_ttft: list[float] = []
        recent_itl: list[float] = []
        for s in self.seconds:
            i = (s.t - start) // _LATENCY_STEP_S
            if 0 <= i < points:
                groups[i][0].extend(s.ttft)
                groups[i][1].extend(s.itl)
            if s.t > end - _SUMMARY_S:
                recent_ttft.extend(s.ttft)
                recent_itl.extend(s.itl)
        out: dict[str, Any] = {"start": start, "step_s": _LATENCY_STEP_S}
        for which, k in (("ttft", 0), ("itl", 1)):
            ordered = [sorted(g[k]) for g in groups]
            for q in (50, 95, 99):
                out[f"{which}_p{q}"] = [_ms(percentile(v, q)) for v in ordered]
        out["last_minute"] = {
            name: {"count": len(values), **{f"p{q}": _ms(percentile(sorted(values), q)) for q in (50, 95, 99)}}
            for name, values in (("ttft", recent_ttft), ("itl", recent_itl))
        }
        return out

    def snapshot(self, gw: Gateway) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data. Never a key, never prompt text the audit
        was not told to keep."""
        now = time.time()
        m = gw.metrics
        by_endpoint = _by_labels(m.requests, "endpoint")
        errors_by_endpoint = _by_labels(m.errors, "endpoint")
        mono = time.monotonic()
        endpoints = []
        for ep in gw.pool:
            ratio = m.prefix_ratio(ep.name)
            endpoints.append({
                "name": ep.name, "url": _public_url(ep.url), "models": sorted(ep.models), "healthy": ep.healthy,
                "available": ep.available(mono), "ejected": mono < ep.ejected_until,
                "ejected_for_s": round(max(0.0, ep.ejected_until - mono), 1), "failures": ep.failures,
                "in_flight": ep.in_flight, "running": ep.running, "waiting": ep.waiting,
                "kv_usage": round(ep.kv_usage, 4), "has_metrics": ep.has_metrics,
                "prefix_hit_ratio": round(ratio, 4) if ratio is not None else None,
                "requests": int(by_endpoint.get(ep.name, 0)), "errors": int(errors_by_endpoint.get(ep.name, 0)),
            })  # fmt: skip
        ratio = m.prefix_ratio()
        semantic = gw.semantic
        audit = gw.config.audit
        return {
            "time": round(now, 3),
            "gateway": {
                "version": _version(),
                "profile": gw.profile.name,
                "uptime_s": round(now - self.started, 1),
                "keys": not gw.governance.open,
                "fairness": gw.queue is not None,
                "semantic": semantic is not None,
                "store": gw.governance.store.kind if gw.governance.store is not None else None,
            },  # fmt: skip
            "totals": {
                "requests": int(sum(by_endpoint.values())),
                "rejected": int(sum(_by_labels(m.rejected, "code").values())),
                "errors": int(sum(errors_by_endpoint.values())),
                "retries": int(sum(_by_labels(m.retries, "endpoint").values())),
                "disconnects": int(_total(m.disconnects)),
                "prefix_hit_ratio": round(ratio, 4) if ratio is not None else None,
            },
            "endpoints": endpoints,
            "series": self.series(now),
            "latency": self.latency(now),
            "routing": self._routing(),
            "semantic": {
                "enabled": semantic is not None,
                "decisions": _by_labels(m.decisions, "decision"),
                "blocked": _by_labels(m.blocked, "code"),
                "pii": _by_labels(m.pii_found, "type"),
                "cache": _by_labels(m.cache, "result") if semantic is not None and semantic.cache is not None else {},
                "recent": list(reversed(self.semantic)),
            },
            "tenants": _tenants(gw),
            "audit": {
                "enabled": audit.enabled and gw.governance.store is not None,
                "content": audit.include_content,
                "recent": list(reversed(self.audit)),
            },  # fmt: skip
        }


def _samples(counter: Counter) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]


def _by_labels(counter: Counter, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _samples(counter):
        out[labels[label]] = out.get(labels[label], 0.0) + value
    return {k: (int(v) if float(v).is_integer() else v) for k, v in out.items()}


def _total(counter: Counter) -> float:
    return sum(v for _, v in _samples(counter))


def _tenants(gw: Gateway) -> list[dict[str, Any]]:
    """Per tenant: what /metrics counts (bounded label set), the budget the limiter holds (the tenant's own,
    else its keys' together when each has one), the tenant's weight."""
    m, gov = gw.metrics, gw.governance
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        if name not in rows:
            rows[name] = {"tenant": name, "requests": 0, "errors": 0, "throttled": 0, "blocked": 0,
                          "tokens_in": 0, "tokens_out": 0, "budget_tokens": None, "budget_left": None,
                          "weight": None}  # fmt: skip
        return rows[name]

    for labels, value in _samples(m.tenant_requests):
        r = row(labels["tenant"])
        r["requests"] += int(value)
        code = int(labels["code"]) if labels["code"].isdigit() else 0
        if code == 429:
            r["throttled"] += int(value)
        elif code >= 500:
            r["errors"] += int(value)
    for labels, value in _samples(m.tenant_tokens):
        row(labels["tenant"])["tokens_in" if labels["direction"] == "in" else "tokens_out"] += int(value)
    for labels, value in _samples(m.tenant_blocked):
        row(labels["tenant"])["blocked"] += int(value)
    keys: dict[str, list[KeyRecord]] = {}
    for key in list(gov.by_hash.values()):
        keys.setdefault(key.tenant, []).append(key)
    for name in [*gov.tenants, *keys]:
        if name not in rows and len(rows) >= m.max_tenants:
            continue
        r = row(name)
        tenant = gov.tenants.get(name)
        if tenant is not None:
            r["weight"] = tenant.weight
        if tenant is not None and tenant.limits.budget_tokens is not None:
            r["budget_tokens"] = tenant.limits.budget_tokens
            r["budget_left"] = gov.limiter.budget_left(tenant_subject(name), tenant.limits)
        elif keys.get(name) and all(k.limits.budget_tokens is not None for k in keys[name]):
            # no tenant budget, but every key has one: the tenant can spend what its keys have left
            r["budget_tokens"] = sum(k.limits.budget_tokens or 0 for k in keys[name])
            r["budget_left"] = sum(gov.limiter.budget_left(key_subject(k.id), k.limits) or 0 for k in keys[name])
    return sorted(rows.values(), key=lambda r: (-r["requests"], r["tenant"]))


def _public_url(url: str) -> str:
    """An endpoint's address without any user:password part."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _version() -> str:
    import agora

    return agora.__version__
