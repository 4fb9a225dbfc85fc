"""The gateway's YAML config, in the spirit of llm-d's EndpointPickerConfig.

::

    endpoints:
      - url: http://127.0.0.1:8001/v1
        models: [smollm2-135m-instruct]     # optional: otherwise asked via /v1/models
    gateway:
      port: 8080
      retries: 2
    plugins:                                # named, parameterised plugin instances
      - name: long-prefix
        type: prefix-cache-scorer
        parameters: {block_chars: 256}
    schedulingProfiles:
      - name: mine
        plugins:
          - {pluginRef: long-prefix, weight: 3}
          - {pluginRef: in-flight-scorer, weight: 1}   # a type name = that plugin with defaults
          - {pluginRef: max-score-picker}
    profile: mine                           # or a shipped one: prefix-aware (default),
                                            # least-load, round-robin, random

Every error names the key it is about.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agora import envs
from agora.config import check_origins, parse_size
from agora.router.endpoints import Endpoint, HealthSettings, base_url, endpoint_names, resolve_endpoints
from agora.router.plugins import PLUGIN_TYPES, Filter, Picker, Plugin, Scorer
from agora.router.profile import SchedulingProfile, WeightedScorer
from agora.router.semantic.config import SemanticSpec

SHIPPED_PROFILES: dict[str, list[dict[str, Any]]] = {
    "round-robin": [{"pluginRef": "round-robin-picker"}],
    "random": [{"pluginRef": "random-picker"}],
    "least-load": [
        {"pluginRef": "in-flight-scorer", "weight": 2},
        {"pluginRef": "queue-scorer", "weight": 1},
        {"pluginRef": "kv-cache-scorer", "weight": 1},
        {"pluginRef": "max-score-picker"},
    ],
    "prefix-aware": [
        {"pluginRef": "load-balance-filter"},
        {"pluginRef": "prefix-cache-scorer", "weight": 3},
        {"pluginRef": "session-affinity-scorer", "weight": 2},
        {"pluginRef": "in-flight-scorer", "weight": 1},
        {"pluginRef": "queue-scorer", "weight": 1},
        {"pluginRef": "kv-cache-scorer", "weight": 1},
        {"pluginRef": "max-score-picker"},
    ],
}
DEFAULT_PROFILE = "prefix-aware"


class ConfigError(ValueError):
    """A config problem, with the key path in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EndpointSpec(_Strict):
    url: str
    name: str | None = None
    models: list[str] | None = None
    api_key: str | None = None
    api_key_env: str | None = Field(None, description="read the endpoint's API key from this variable")
    # dns: the URL's host names a set of servers (a Kubernetes headless Service): one endpoint per address it
    # resolves to, re-resolved while the gateway runs, so pods that come and go join and leave the pool
    discover: Literal["dns"] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return base_url(v)


class DeploymentSpec(_Strict):
    """One model of `agora serve --ray` (the ``deployments:`` section): Ray Serve replicas of an engine."""

    model: str = Field(description="packaged model name, HF folder or .gguf file (on every node)")
    name: str | None = Field(None, description="the Serve deployment's name (default: from the model)")
    replicas: int | None = Field(None, ge=1, description="a fixed count (default: --replicas)")
    min_replicas: int | None = Field(None, ge=1, description="autoscaling, with max_replicas")
    max_replicas: int | None = Field(None, ge=1)
    num_cpus_per_replica: float | None = Field(None, ge=0)
    num_gpus_per_replica: float | None = Field(None, ge=0)
    # engine and server fields by name (agora.config), e.g. max_num_seqs: 32, served_model_name: smol
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentSpec:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give min_replicas and max_replicas together")
        if self.min_replicas is not None:
            if self.replicas is not None:
                raise ValueError("give replicas or min_replicas/max_replicas, not both")
            if self.min_replicas > self.max_replicas:  # type: ignore[operator]
                raise ValueError("min_replicas is above max_replicas")
        return self


class GatewaySettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_in_flight_per_endpoint: int = Field(256, ge=1, description="beyond this on every endpoint: 429")
    retries: int = Field(2, ge=0, le=16, description="other endpoints tried after a failure before the first byte")
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0)
    scrape_interval_s: float = Field(0.5, ge=0.05)
    models_refresh_s: float = Field(10.0, ge=0.1)
    check_timeout_s: float = Field(2.0, gt=0)
    eject_after_failures: int = Field(3, ge=1)
    eject_backoff_s: float = Field(1.0, gt=0)
    eject_backoff_max_s: float = Field(30.0, gt=0)
    session_header: str = "x-session-id"
    max_header_bytes: int = Field(32 << 10, ge=1024, description="all request headers together; beyond: 431")
    shutdown_timeout_s: float = Field(30.0, ge=0, le=3600, description="on SIGTERM: how long requests in flight "
                                      "may run before they end with an error in their API's shape")  # fmt: skip
    allowed_origins: list[str] = Field(default_factory=list, description="browser pages from these origins may "
                                       "call the gateway (CORS; '*': any); others' changes are refused")  # fmt: skip
    client_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request's head must arrive within this, "
                                    "and its body pause no longer; slower connections are closed (408)")  # fmt: skip
    seed: int | None = None

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return list(check_origins(v))

    def health(self) -> HealthSettings:
        return HealthSettings(
            scrape_interval_s=self.scrape_interval_s,
            models_refresh_s=self.models_refresh_s,
            check_timeout_s=self.check_timeout_s,
            eject_after_failures=self.eject_after_failures,
            eject_backoff_s=self.eject_backoff_s,
            eject_backoff_max_s=self.eject_backoff_max_s,
        )


class GovernanceSettings(_Strict):
    """Keys, limits and the store (see agora.router.governance)."""

    sync_interval_s: float = Field(0.5, gt=0, le=60, description="store sync: revocations, budgets, audit flush")
    default_reserve_tokens: int = Field(1024, ge=1, description="reserved for a request that names no max_tokens")
    auth_failures_per_minute: int = Field(20, ge=1, description="wrong keys from one client before it is slowed")
    session_max_requests: int | None = Field(None, ge=1, description="per x-session-id, unless the key says")
    session_max_tokens: int | None = Field(None, ge=1)
    metrics_max_tenants: int = Field(50, ge=1, description="tenants with their own metric labels; others: other")


class FairnessSettings(_Strict):
    """Queue at the gateway when the endpoints are saturated, and dispatch fairly."""

    enabled: bool = False
    slots_per_endpoint: int = Field(8, ge=1, description="requests in flight per endpoint before queueing")
    max_queue: int = Field(1024, ge=0, description="requests waiting at most; beyond: 429")
    max_wait_s: float = Field(60.0, gt=0, description="longest wait in the queue; then 503")
    interactive_reserve: int = Field(0, ge=0, description="slots per endpoint only the interactive band may use")


class AuditSettings(_Strict):
    enabled: bool = True
    include_content: bool = Field(False, description="keep prompt and completion text in the records")


class DashboardSettings(_Strict):
    """``GET /dashboard`` and its live feed (``agora top`` reads the same feed)."""

    enabled: bool = True
    interval_s: float = Field(1.0, ge=0.25, le=60, description="seconds between two updates of the feed")
    window_s: int = Field(300, ge=60, le=3600, description="seconds of history the charts show")
    max_clients: int = Field(32, ge=1, le=1024, description="feeds open at once; beyond: 429")
    session_ttl_s: float = Field(12 * 3600, gt=0, description="how long a dashboard login lasts")


class PluginSpec(_Strict):
    type: str
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class PluginRef(_Strict):
    plugin_ref: str = Field(alias="pluginRef")
    weight: float = Field(1.0, ge=0)


class ProfileSpec(_Strict):
    name: str
    plugins: list[PluginRef]


class RouterConfig(_Strict):
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    plugins: list[PluginSpec] = Field(default_factory=list)
    scheduling_profiles: list[ProfileSpec] = Field(default_factory=list, alias="schedulingProfiles")
    profile: str = DEFAULT_PROFILE
    semantic: SemanticSpec | None = None
    # model names agents send -> a model the endpoints serve (a name or a glob: "claude-*")
    model_aliases: dict[str, str] = Field(default_factory=dict)
    # the governance store: sqlite:///path (default: under the cache folder) or postgresql://...
    db: str | None = None
    governance: GovernanceSettings = Field(default_factory=GovernanceSettings)
    fairness: FairnessSettings = Field(default_factory=FairnessSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    # `agora serve --ray`: the models of the app (ignored by `agora route`)
    deployments: list[DeploymentSpec] = Field(default_factory=list)

    # -- building -----------------------------------------------------------------

    def _key(self, i: int, spec: EndpointSpec) -> str | None:
        if spec.api_key_env:
            key = envs.variable(spec.api_key_env)
            if key is None:
                raise ConfigError(f"endpoints[{i}].api_key_env: the variable {spec.api_key_env} is not set")
            return key
        return spec.api_key

    def build_endpoints(self) -> list[Endpoint]:
        """The fixed endpoints (``discover: dns`` ones are found by `build_discovery`)."""
        names = endpoint_names([e.url for e in self.endpoints])
        out = []
        for i, (spec, default_name) in enumerate(zip(self.endpoints, names, strict=True)):
            if spec.discover is not None:
                continue
            models = frozenset(spec.models) if spec.models is not None else None
            out.append(Endpoint(name=spec.name or default_name, url=spec.url, api_key=self._key(i, spec),
                                declared_models=models))  # fmt: skip
        seen: set[str] = set()
        for i, ep in enumerate(out):
            if ep.name in seen:
                raise ConfigError(f"endpoints[{i}].name: {ep.name!r} is used twice")
            seen.add(ep.name)
        return out

    def build_discovery(self) -> Any:
        """The gateway's ``discover`` callable for ``discover: dns`` endpoints (None without any): the fixed
        endpoints plus one per address each name resolves to now."""
        dns = [(i, spec) for i, spec in enumerate(self.endpoints) if spec.discover == "dns"]
        if not dns:
            return None
        resolved = [(spec, self._key(i, spec)) for i, spec in dns]
        fixed = self.build_endpoints()

        async def discover() -> list[Endpoint]:
            found = [Endpoint(ep.name, ep.url, ep.api_key, ep.declared_models) for ep in fixed]
            for spec, key in resolved:
                found += await resolve_endpoints(spec.url, spec.name, key, spec.models)
            return found

        return discover

    def build_profile(self) -> SchedulingProfile:
        instances: dict[str, Plugin] = {}
        for i, spec in enumerate(self.plugins):
            cls = PLUGIN_TYPES.get(spec.type)
            if cls is None:
                raise ConfigError(
                    f"plugins[{i}].type: unknown plugin type {spec.type!r}; known: {', '.join(PLUGIN_TYPES)}"
                )
            name = spec.name or spec.type
            if name in instances:
                raise ConfigError(f"plugins[{i}].name: {name!r} is defined twice")
            try:
                params = cls.Params.model_validate(spec.parameters)
            except ValidationError as exc:
                raise ConfigError(_format(exc, f"plugins[{i}].parameters")) from None
            instances[name] = cls(name, params)

        profiles = {p.name: p.plugins for p in self.scheduling_profiles}
        for shipped, refs in SHIPPED_PROFILES.items():
            profiles.setdefault(shipped, [PluginRef.model_validate(r) for r in refs])
        if self.profile not in profiles:
            raise ConfigError(f"profile: no profile named {self.profile!r}; known: {', '.join(profiles)}")
        where = next((f"schedulingProfiles[{i}]" for i, p in enumerate(self.scheduling_profiles)
                      if p.name == self.profile), f"shipped profile {self.profile}")  # fmt: skip

        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        pickers: list[Picker] = []
        for j, ref in enumerate(profiles[self.profile]):
            plugin = instances.get(ref.plugin_ref)
            if plugin is None:
                cls = PLUGIN_TYPES.get(ref.plugin_ref)
                if cls is None:
                    raise ConfigError(
                        f"{where}.plugins[{j}].pluginRef: no plugin named {ref.plugin_ref!r}; define it under "
                        f"plugins: or use a type name ({', '.join(PLUGIN_TYPES)})"
                    )
                plugin = instances[ref.plugin_ref] = cls(ref.plugin_ref)
            if isinstance(plugin, Filter):
                filters.append(plugin)
            elif isinstance(plugin, Scorer):
                scorers.append(WeightedScorer(plugin, ref.weight))
            elif isinstance(plugin, Picker):
                pickers.append(plugin)
        if len(pickers) > 1:
            raise ConfigError(f"{where}.plugins: at most one picker, got {', '.join(p.name for p in pickers)}")
        picker = pickers[0] if pickers else PLUGIN_TYPES["max-score-picker"]("max-score-picker")
        return SchedulingProfile(self.profile, filters, scorers, picker, rng=random.Random(self.gateway.seed))  # type: ignore[arg-type]


def _format(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{path or 'config'}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> RouterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        config = RouterConfig.model_validate(data)
        config.build_endpoints()  # build once now so that every problem shows at load time
        config.build_profile()
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: str | os.PathLike[str]) -> RouterConfig:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_config(data, str(p))
