"""Backend endpoints and what the gateway knows about them.

An ``Endpoint`` is one OpenAI-compatible server (agora, vLLM, llama.cpp's server, ...).
Its state has two sources:

* scraped every ``scrape_interval_s`` from the endpoint itself: ``/health``, the
  models it serves (``/v1/models``) and, from ``/metrics`` under vLLM's names, its
  running and waiting requests and KV-cache usage;
* kept by the gateway: requests in flight through this gateway, failures in a row,
  and ejection.

Ejection: ``eject_after_failures`` failures in a row (failed requests or failed
health checks) take the endpoint out for a back-off period that doubles each time
(up to ``eject_backoff_max_s``). When the period is over, the next health check
probes it; a success brings it back and resets the back-off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

logger = logging.getLogger(__name__)

# Metric names as vLLM exports them (agora uses the same). Older vLLM called the
# KV usage gpu_cache_usage_perc.
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def base_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000': requests are sent to base + their own path."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint URL must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(slots=True, eq=False)
class Endpoint:
    """One backend server and everything the scheduling plugins may look at."""

    name: str
    url: str  # base URL, no trailing /v1
    api_key: str | None = None
    declared_models: frozenset[str] | None = None  # from the config; None = ask /v1/models
    models: frozenset[str] = frozenset()
    max_model_len: dict[str, int] = field(default_factory=dict)  # as /v1/models says (vLLM and agora do)
    # scraped
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    has_metrics: bool = False
    # kept by the gateway
    in_flight: int = 0
    healthy: bool = False
    failures: int = 0
    ejected_until: float = 0.0
    backoff_s: float = 0.0
    last_check: float = 0.0

    def __post_init__(self) -> None:
        if self.declared_models is not None:
            self.models = self.declared_models

    @property
    def load(self) -> int:
        """Requests this endpoint is busy with: what it reports or what we sent, whichever is larger."""
        return max(self.in_flight, self.running + self.waiting)

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.models

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until


def parse_vllm_metrics(text: str) -> tuple[int, int, float] | None:
    """(running, waiting, kv usage 0..1) summed over label sets, or None if none are present.

    A line-level parser on purpose: it is called for every endpoint several times a
    second and only needs three gauges out of a large exposition.
    """
    running = waiting = 0.0
    kv: float | None = None
    found = False
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace != -1 and (space == -1 or brace < space):  # name{labels} value [timestamp]
            name, value_text = line[:brace], line[line.rfind("}") + 1 :]
        else:  # name value [timestamp]
            name, value_text = line[:space], line[space:]
        fields = value_text.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if name == _RUNNING:
            running += value
            found = True
        elif name == _WAITING:
            waiting += value
            found = True
        elif name in _KV_USAGE:
            kv = max(kv or 0.0, value)
            found = True
    if not found:
        return None
    return int(running), int(waiting), float(kv or 0.0)


@dataclass
class HealthSettings:
    scrape_interval_s: float = 0.5
    models_refresh_s: float = 10.0
    check_timeout_s: float = 2.0
    eject_after_failures: int = 3
    eject_backoff_s: float = 1.0
    eject_backoff_max_s: float = 30.0


@dataclass
class EndpointPool:
    """The endpoints, their health checks and ejection."""

    endpoints: list[Endpoint]
    settings: HealthSettings = field(default_factory=HealthSettings)
    on_eject: list[Callable[[Endpoint], None]] = field(default_factory=list)
    on_state: list[Callable[[Endpoint], None]] = field(default_factory=list)
    on_leave: list[Callable[[Endpoint], None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _task: asyncio.Task | None = None
    _last_models: dict[str, float] = field(default_factory=dict)

    def __iter__(self):  # noqa: ANN204
        return iter(self.endpoints)

    def models(self) -> list[str]:
        return sorted({m for ep in self.endpoints for m in ep.models})

    def update(self, found: list[Endpoint]) -> tuple[list[Endpoint], list[Endpoint]]:
        """Make the set ``found`` (by name): new endpoints join (not healthy until their first check passes),
        missing ones leave (requests already on them finish). Returns (joined, left)."""
        names = {ep.name for ep in found}
        have = {ep.name for ep in self.endpoints}
        joined = [ep for ep in found if ep.name not in have]
        left = [ep for ep in self.endpoints if ep.name not in names]
        if joined or left:
            self.endpoints = [ep for ep in self.endpoints if ep.name in names] + joined
            for ep in left:
                ep.healthy = False  # a request still holding it will not count it as a candidate again
                self._last_models.pop(ep.name, None)
                logger.info("endpoint %s left", ep.name)
                for fn in self.on_leave:
                    fn(ep)
            for ep in joined:
                logger.info("endpoint %s joined at %s", ep.name, ep.url)
        return joined, left

    # -- passive signals from proxied requests ----------------------------------

    def record_success(self, ep: Endpoint) -> None:
        ep.failures = 0

    def record_failure(self, ep: Endpoint, why: str) -> None:
        ep.failures += 1
        logger.warning("endpoint %s failed (%s), %d in a row", ep.name, why, ep.failures)
        if ep.failures >= self.settings.eject_after_failures:
            self.eject(ep)

    def eject(self, ep: Endpoint) -> None:
        s = self.settings
        ep.backoff_s = s.eject_backoff_s if ep.backoff_s == 0 else min(ep.backoff_s * 2, s.eject_backoff_max_s)
        ep.ejected_until = time.monotonic() + ep.backoff_s
        ep.healthy = False
        ep.failures = 0
        logger.warning("endpoint %s ejected for %.1f s", ep.name, ep.backoff_s)
        for fn in self.on_eject:
            fn(ep)

    # -- active health checks ------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """First check of every endpoint (so a ready gateway knows its models), then the loop."""
        self._session = session
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled, or whatever it was doing failed: it is over
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval_s)
            try:
                await self.check_all()
            except Exception:  # never let the loop die: stale state is better than none
                logger.exception("health check loop")

    async def check_all(self) -> None:
        now = time.monotonic()
        due = [ep for ep in self.endpoints if now >= ep.ejected_until]
        await asyncio.gather(*(self.check(ep) for ep in due))

    def _headers(self, ep: Endpoint) -> dict[str, str]:
        return {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}

    async def _get(self, ep: Endpoint, path: str) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.settings.check_timeout_s)
        async with self._session.get(ep.url + path, headers=self._headers(ep), timeout=timeout) as resp:
            return resp.status, await resp.read()

    async def check(self, ep: Endpoint) -> None:
        """Health, models and load of one endpoint; a failure counts towards ejection."""
        was_ejected = ep.ejected_until > 0
        ejection = ep.ejected_until  # to notice an ejection that happens while this check is awaiting
        try:
            status, _ = await self._get(ep, "/health")
            ok = status == 200
            if status == 404:  # servers without /health: answering /v1/models is healthy enough
                ok = await self._refresh_models(ep)
            elif ok and self._models_due(ep):
                ok = await self._refresh_models(ep)
            if ok:
                await self._scrape_metrics(ep)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            ok = False
            why = f"health check: {type(exc).__name__}: {exc}"
        else:
            why = "health check: not healthy"
        if ep.ejected_until != ejection:
            return  # ejected (by failed requests) while this check ran: its answer predates that
        ep.last_check = time.monotonic()
        if ok:
            if not ep.healthy:  # (back) in: a clean slate. While healthy, only a good request resets failures.
                logger.info("endpoint %s is %s (models: %s)", ep.name,
                            "back" if was_ejected else "healthy", ", ".join(sorted(ep.models)) or "none")  # fmt: skip
                ep.healthy = True
                ep.failures = 0
                ep.ejected_until = 0.0
                ep.backoff_s = 0.0
        elif was_ejected:
            self.eject(ep)  # the probe after the back-off failed: out again, for longer
        elif ep.healthy:
            self.record_failure(ep, why)  # one slow answer under load is not enough to leave
        # else: never healthy yet (still starting): keep checking every interval
        for fn in self.on_state:
            fn(ep)

    def _models_due(self, ep: Endpoint) -> bool:
        if ep.declared_models is not None:
            return False
        last = self._last_models.get(ep.name)
        return last is None or time.monotonic() - last >= self.settings.models_refresh_s or not ep.models

    async def _refresh_models(self, ep: Endpoint) -> bool:
        status, body = await self._get(ep, "/v1/models")
        if status != 200:
            return False
        if ep.declared_models is None:
            data = json.loads(body)
            cards = [m for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
            ep.models = frozenset(str(m["id"]) for m in cards)
            ep.max_model_len = {str(m["id"]): n for m in cards if type(n := m.get("max_model_len")) is int and n > 0}
            self._last_models[ep.name] = time.monotonic()
        return True

    async def _scrape_metrics(self, ep: Endpoint) -> None:
        try:
            status, body = await self._get(ep, "/metrics")
        except (TimeoutError, aiohttp.ClientError):
            return  # health already passed; load state just stays as it was
        parsed = parse_vllm_metrics(body.decode("utf-8", "replace")) if status == 200 else None
        ep.has_metrics = parsed is not None
        if parsed is not None:
            ep.running, ep.waiting, ep.kv_usage = parsed


async def resolve_endpoints(url: str, name: str | None, api_key: str | None,
                            models: list[str] | None) -> list[Endpoint]:  # fmt: skip
    """One endpoint per address ``url``'s host resolves to (IPv4 and IPv6), named ``name-or-host@address``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[Endpoint] = []
    for addr in sorted({info[4][0] for info in infos}):
        netloc = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        out.append(Endpoint(name=f"{name or host}@{addr}", url=f"{parts.scheme}://{netloc}{parts.path}",
                            api_key=api_key, declared_models=frozenset(models) if models is not None else None))  # fmt: skip
    return out


def endpoint_names(urls: Iterable[str]) -> list[str]:
    """Readable unique names from URLs: host:port, with a suffix on clashes."""
    names: list[str] = []
    for url in urls:
        name = urlsplit(url).netloc or url
        candidate, i = name, 1
        while candidate in names:
            i += 1
            candidate = f"{name}#{i}"
        names.append(candidate)
    return names
