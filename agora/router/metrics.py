"""The gateway's own Prometheus metrics.

Counters are updated as requests pass; endpoint state (health, in flight, scraped
load) and per-plugin time are read from the live objects at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agora.http_server import REFUSALS, REFUSALS_HELP
from agora.router.endpoints import EndpointPool
from agora.router.profile import SchedulingProfile

_PICK_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class _StateCollector(Collector):
    def __init__(self, pool: EndpointPool, profile: SchedulingProfile, counters: GatewayMetrics) -> None:
        self.pool, self.profile, self.counters = pool, profile, counters

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "healthy": ("agora_gateway_endpoint_healthy", "1 if the endpoint can be picked (healthy, not ejected)."),
            "in_flight": ("agora_gateway_endpoint_in_flight", "Requests this gateway has in flight there."),
            "running": ("agora_gateway_endpoint_running", "Running requests the endpoint reports (vLLM metric)."),
            "waiting": ("agora_gateway_endpoint_waiting", "Waiting requests the endpoint reports (vLLM metric)."),
            "kv_usage": ("agora_gateway_endpoint_kv_cache_usage", "KV-cache usage the endpoint reports (0..1)."),
        }
        now = time.monotonic()
        for attr, (name, doc) in gauges.items():
            fam = GaugeMetricFamily(name, doc, labels=["endpoint"])
            for ep in self.pool:
                value = ep.available(now) if attr == "healthy" else getattr(ep, attr)
                fam.add_metric([ep.name], float(value))
            yield fam
        plugin = CounterMetricFamily("agora_gateway_plugin_seconds", "Time spent in each scheduling plugin.",
                                     labels=["plugin"])  # fmt: skip
        for name, seconds in self.profile.plugin_seconds.items():
            plugin.add_metric([name], seconds)
        yield plugin
        yield GaugeMetricFamily(
            "agora_gateway_prefix_hit_ratio",
            "Share of prompt blocks already sent to the endpoint picked (prefix affinity), since start.",
            value=self.counters.prefix_ratio() or 0.0,
        )
        per_endpoint = GaugeMetricFamily("agora_gateway_endpoint_prefix_hit_ratio", "Share of prompt blocks already "
                                         "sent to this endpoint when it was picked, since start.", labels=["endpoint"])  # fmt: skip
        for name in self.counters.endpoint_prefix:
            per_endpoint.add_metric([name], self.counters.prefix_ratio(name) or 0.0)
        yield per_endpoint


class GatewayMetrics:
    def __init__(self, pool: EndpointPool, profile: SchedulingProfile, max_tenants: int = 50) -> None:
        disable_created_metrics()  # the *_created series double the exposition for nothing a router needs
        r = self.registry = CollectorRegistry()
        self.requests = Counter("agora_gateway_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "code"], registry=r)  # fmt: skip
        self.errors = Counter("agora_gateway_endpoint_errors",
                              "Endpoint failures: connect, timeout, status_5xx, stream (broke after the first byte).",
                              ["endpoint", "kind"], registry=r)  # fmt: skip
        self.rejected = Counter("agora_gateway_rejected", "Requests the gateway answered itself, by HTTP status.",
                                ["code"], registry=r)  # fmt: skip
        self.retries = Counter("agora_gateway_retries", "Requests retried on another endpoint, by failed endpoint.",
                               ["endpoint"], registry=r)  # fmt: skip
        self.ejections = Counter("agora_gateway_ejections", "Times an endpoint was ejected.", ["endpoint"], registry=r)
        self.disconnects = Counter("agora_gateway_client_disconnects",
                                   "Clients that went away before the answer ended (upstream cancelled).", registry=r)  # fmt: skip
        self.pick_seconds = Histogram("agora_gateway_pick_seconds", "Time to pick an endpoint.",
                                      buckets=_PICK_BUCKETS, registry=r)  # fmt: skip
        self.prefix_queried = Counter("agora_gateway_prefix_blocks_queried",
                                      "Prompt blocks looked up by the prefix-cache scorer.", registry=r)  # fmt: skip
        self.prefix_hit = Counter("agora_gateway_prefix_blocks_hit",
                                  "Prompt blocks already sent to the endpoint picked.", registry=r)  # fmt: skip
        self.decisions = Counter("agora_gateway_semantic_decisions", "Requests by semantic decision.",
                                 ["decision"], registry=r)  # fmt: skip
        self.blocked = Counter("agora_gateway_semantic_blocked", "Requests refused by the guards (403), by code.",
                               ["code"], registry=r)  # fmt: skip
        self.pii_found = Counter("agora_gateway_pii_detected", "Requests with personal data, by type.", ["type"],
                                 registry=r)  # fmt: skip
        self.cache = Counter("agora_gateway_semantic_cache", "Semantic cache lookups: hit_exact, hit_semantic, "
                             "miss, bypass (not cacheable), store.", ["result"], registry=r)  # fmt: skip
        for result in ("hit_exact", "hit_semantic", "miss", "bypass", "store"):
            self.cache.labels(result)
        self.classify_seconds = Histogram("agora_gateway_classify_seconds", "Time to compute the semantic signals.",
                                          buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)  # fmt: skip
        self.tenant_requests = Counter("agora_gateway_tenant_requests", "Requests per tenant and HTTP status "
                                       "(tenants beyond the label bound count as other).", ["tenant", "code"],
                                       registry=r)  # fmt: skip
        self.tenant_tokens = Counter("agora_gateway_tenant_tokens", "Tokens per tenant, in (prompt) and out.",
                                     ["tenant", "direction"], registry=r)  # fmt: skip
        self.tenant_blocked = Counter("agora_gateway_tenant_blocked", "Requests refused per tenant, by reason "
                                      "(a limit, a guard, a permission).", ["tenant", "reason"], registry=r)  # fmt: skip
        self.tenant_queue = Counter("agora_gateway_tenant_queue_seconds", "Seconds spent in the fair queue per "
                                    "tenant.", ["tenant"], registry=r)  # fmt: skip
        self.queue_seconds = Histogram("agora_gateway_queue_seconds", "Time a request waited in the fair queue.",
                                       buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)  # fmt: skip
        self.auth_throttled = Counter("agora_gateway_auth_throttled", "Requests refused because their client "
                                      "sent too many invalid keys.", registry=r)  # fmt: skip
        self.http_refused = Counter("agora_gateway_http_refused", REFUSALS_HELP, ["reason"], registry=r)
        for reason in REFUSALS:
            self.http_refused.labels(reason)
        self.max_tenants = max_tenants
        self._tenant_labels: set[str] = set()
        self.endpoint_prefix: dict[str, tuple[int, int]] = {}  # endpoint -> (hit, queried) blocks
        r.register(_StateCollector(pool, profile, self))
        for ep in pool:
            self.ejections.labels(ep.name)
            self.retries.labels(ep.name)

    def prefix(self, endpoint: str, hit: int, queried: int) -> None:
        h, q = self.endpoint_prefix.get(endpoint, (0, 0))
        self.endpoint_prefix[endpoint] = (h + hit, q + queried)
        self.prefix_hit.inc(hit)
        self.prefix_queried.inc(queried)

    def prefix_ratio(self, endpoint: str | None = None) -> float | None:
        """Prompt blocks already sent to the endpoint picked, over those looked up, since start: of one endpoint,
        or of all; None before any lookup."""
        counts = [self.endpoint_prefix.get(endpoint, (0, 0))] if endpoint is not None else self.endpoint_prefix.values()
        hit, queried = sum(h for h, _ in counts), sum(q for _, q in counts)
        return hit / queried if queried else None

    def tenant_label(self, tenant: str | None) -> str:
        """A bounded label set: the first ``max_tenants`` tenants by name, then ``other``."""
        if tenant is None:
            return "anonymous"
        if tenant in self._tenant_labels:
            return tenant
        if len(self._tenant_labels) < self.max_tenants:
            self._tenant_labels.add(tenant)
            return tenant
        return "other"

    def tenant(self, tenant: str | None, ctx: Any, tokens_in: int, tokens_out: int) -> None:
        """One request's outcome in the per-tenant series (``ctx`` is its pipeline context)."""
        label = self.tenant_label(tenant)
        self.tenant_requests.labels(label, str(ctx.status)).inc()
        if tokens_in:
            self.tenant_tokens.labels(label, "in").inc(tokens_in)
        if tokens_out:
            self.tenant_tokens.labels(label, "out").inc(tokens_out)
        if ctx.reason and ctx.status is not None and ctx.status in (401, 403, 429, 503) and not ctx.complete:
            self.tenant_blocked.labels(label, ctx.reason).inc()
        if ctx.slot is not None and ctx.slot.waited:
            self.tenant_queue.labels(label).inc(ctx.slot.waited)

    def refused(self, reason: str) -> None:
        """agora.http_server's ``refused`` callback."""
        self.http_refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
