"""`agora bench serve`: load any OpenAI-compatible server and measure it the way
`vllm bench serve` does (TTFT, TPOT, ITL, E2E, throughput, goodput).

Every request streams, so the time of each chunk is seen. Requests that fail are
counted and shown, never dropped from the totals silently.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from agora.bench.workloads import AgentSession, RequestSpec


@dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float | None = None  # seconds from send to the first content
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    turn: int = 0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchConfig:
    base_url: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)


async def send(client: httpx.AsyncClient, cfg: BenchConfig, spec: RequestSpec) -> RequestResult:
    """One streamed request; its timings and token counts (from the server's usage)."""
    chat = spec.messages is not None
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **cfg.extra_body,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, turn=spec.turn)
    last = start
    chunks = 0
    pieces: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {resp.status_code}: {detail}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:300]
                    return res
                usage = event.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.output_tokens = usage.get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(text)
        res.e2e = time.perf_counter() - start
        if not res.output_tokens:
            res.output_tokens = chunks  # server sent no usage: one token per chunk
        res.text = "".join(pieces)
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


def _client(cfg: BenchConfig, concurrency: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=max(concurrency, 1) + 4)
    return httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout, limits=limits)


async def run_requests(
    cfg: BenchConfig,
    specs: Iterable[RequestSpec],
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    progress: Any = None,
) -> tuple[list[RequestResult], float]:
    """Closed loop (``concurrency`` in flight) or open loop (Poisson ``request_rate``,
    optionally capped by ``concurrency``). Returns the results and the wall time."""
    specs = list(specs)
    limit = asyncio.Semaphore(concurrency or len(specs) or 1)
    rng = random.Random(seed)
    async with _client(cfg, concurrency or 64) as client:

        async def one(spec: RequestSpec) -> RequestResult:
            async with limit:
                r = await send(client, cfg, spec)
            if progress is not None:
                progress.update(1)
            return r

        t0 = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(one(spec)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


async def run_agents(
    cfg: BenchConfig, sessions: list[AgentSession], progress: Any = None
) -> tuple[list[RequestResult], float]:
    """Every agent runs its turns in order; all agents run at once."""
    async with _client(cfg, len(sessions)) as client:

        async def agent(s: AgentSession) -> list[RequestResult]:
            out = []
            for turn in range(s.turns):
                r = await send(client, cfg, s.request(turn))
                out.append(r)
                if progress is not None:
                    progress.update(1)
                if not r.ok:
                    break  # the conversation cannot go on without the reply
                s.advance(r.text, turn)
            return out

        t0 = time.perf_counter()
        per_agent = await asyncio.gather(*(agent(s) for s in sessions))
        return [r for rs in per_agent for r in rs], time.perf_counter() - t0


# -- metrics --------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_ms(values: list[float]) -> dict[str, float]:
    """mean, median, p90, p99 in milliseconds."""
    ms = [v * 1000 for v in values]
    return {
        "mean": statistics.fmean(ms) if ms else float("nan"),
        "median": _pct(ms, 0.5),
        "p90": _pct(ms, 0.9),
        "p99": _pct(ms, 0.99),
    }


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 0.5, 'tpot': 0.05} (SLOs in ms on the command line)."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"bad --goodput item {item!r}: want ttft:MS, tpot:MS or e2e:MS")
        slos[key] = float(value) / 1000
    return slos


def compute_metrics(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def meets(r: RequestResult) -> bool:
        checks = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
        return all(checks[k] is None or checks[k] <= v for k, v in slos.items())  # type: ignore[operator]

    later = [r.ttft for r in ok if r.turn > 0 and r.ttft is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "unknown").split(":", 1)[0]
            errors[key] = errors.get(key, 0) + 1
    metrics: dict[str, Any] = {
        "duration_s": duration,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "first_error": next((r.error for r in results if not r.ok), None),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": summarize_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summarize_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summarize_ms([x for r in ok for x in r.itl]),
        "e2e_ms": summarize_ms([r.e2e for r in ok if r.e2e is not None]),
    }
    if later:
        metrics["ttft_later_turns_ms"] = summarize_ms(later)
    if slos:
        good = sum(1 for r in ok if meets(r))
        metrics["goodput"] = {"slo_ms": {k: v * 1000 for k, v in slos.items()}, "requests_per_s": good / duration,
                              "fraction": good / len(results) if results else 0.0}  # fmt: skip
    return metrics


def raw_samples(results: list[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {
        "ttft_s": [r.ttft for r in ok if r.ttft is not None],
        "tpot_s": [t for r in ok if (t := r.tpot) is not None],
        "itl_s": [x for r in ok for x in r.itl],
        "e2e_s": [r.e2e for r in ok if r.e2e is not None],
    }


def result_record(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(r).items() if k not in ("text", "itl")} for r in results]
