"""Prometheus metrics under vLLM's names, so dashboards and routers built for vLLM work.

Engine state (queue sizes, KV usage, token and prefix-cache counters) is read
from the engine's stats snapshot at scrape time; per-request latencies are
observed by the server as requests finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agora.engine.engine import EngineStats
from agora.engine.spec import SpecStats
from agora.http_server import REFUSALS, REFUSALS_HELP

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.labels = {"model_name": model_name}

    def _family(self, cls: type, name: str, doc: str, value: float) -> GaugeMetricFamily | CounterMetricFamily:
        fam = cls(name, doc, labels=list(self.labels))
        fam.add_metric(list(self.labels.values()), value)
        return fam

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield self._family(g, "vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._family(g, "vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._family(
            g, "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s.kv_cache_usage
        )
        yield self._family(
            c, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield self._family(c, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._family(c, "vllm:num_preemptions", "Requests preempted for lack of KV blocks.", s.num_preemptions)
        yield self._family(c, "vllm:prompt_tokens", "Prompt tokens received.", s.prompt_tokens)
        yield self._family(c, "vllm:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._family(
            c, "agora:requests_aborted", "Requests aborted before finishing (e.g. client gone).", s.num_aborted
        )
        yield from self._steps(s)
        if s.spec is not None:
            yield from self._spec(s.spec)

    def _steps(self, s: EngineStats) -> Iterator[CounterMetricFamily]:
        """Engine steps and their wall time by kind: prefill (computes a prompt chunk, decoding sequences
        may share it), verify (some sequence checks drafts), decode."""
        steps = CounterMetricFamily("agora:engine_steps", "Engine steps, by kind.", labels=[*self.labels, "kind"])
        seconds = CounterMetricFamily("agora:engine_step_seconds", "Seconds spent in engine steps, by kind.",
                                      labels=[*self.labels, "kind"])  # fmt: skip
        for kind, n in s.steps.items():
            steps.add_metric([*self.labels.values(), kind], n)
            seconds.add_metric([*self.labels.values(), kind], s.step_seconds.get(kind, 0.0))
        yield steps
        yield seconds

    def _spec(self, spec: SpecStats) -> Iterator[CounterMetricFamily]:
        """Speculative decoding, as vLLM exports it (acceptance rate = accepted / draft tokens)."""
        c = CounterMetricFamily
        yield self._family(c, "vllm:spec_decode_num_drafts", "Verification steps of sequences with drafts.",
                           spec.num_drafts)  # fmt: skip
        yield self._family(c, "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens)
        yield self._family(c, "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                           spec.num_accepted_tokens)  # fmt: skip
        fam = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by position in the draft.",
                                  labels=[*self.labels, "position"])  # fmt: skip
        for pos, n in enumerate(spec.accepted_per_pos):
            fam.add_metric([*self.labels.values(), str(pos)], n)
        yield fam


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
            buckets=_E2E_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self.prompt_len = Histogram(
            "vllm:request_prompt_tokens", "Prompt length of finished requests.", labels,
            buckets=_TOKEN_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self.gen_len = Histogram(
            "vllm:request_generation_tokens", "Generated length of finished requests.", labels,
            buckets=_TOKEN_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=self.registry,
        )  # fmt: skip
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)  # export zeros from the start
        self.rejected = Counter(
            "agora:requests_rejected", "Requests refused before reaching the engine, by HTTP status.",
            ["model_name", "status"], registry=self.registry,
        )  # fmt: skip
        for status in ("413", "429", "503"):
            self.rejected.labels(model_name, status)
        self.http_refused = Counter("agora:http_refused", REFUSALS_HELP, ["model_name", "reason"],
                                    registry=self.registry)  # fmt: skip
        for reason in REFUSALS:
            self.http_refused.labels(model_name, reason)

    def refused(self, reason: str) -> None:
        """agora.http_server's ``refused`` callback."""
        self.http_refused.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
