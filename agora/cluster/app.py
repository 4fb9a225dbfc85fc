"""The Ray Serve application: a `Registry`, one `EngineReplica` deployment per model, and the
`AgoraApp` ingress that lists the replicas (and, under KubeRay, runs the gateway itself).

``build(...)`` is what `agora serve --ray` deploys; ``from_yaml`` is the same application as a
Serve import path (``serve run agora.cluster.app:from_yaml config=agora.yaml``, or a KubeRay
``RayService``'s ``serveConfigV2``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from ray import serve

from agora.cluster.registry import Registry
from agora.cluster.replica import EngineReplica
from agora.config import ClusterConfig, ServeConfig, with_options
from agora.router.replicas import replica_config

logger = logging.getLogger("agora.cluster")

POLICY = "agora.cluster.autoscale:engine_load_policy"
# Serve's replicas report their request metrics every 100 ms by default; agora's requests never pass
# through Serve, so those metrics are empty, and the loop is CPU the engines do not get on a small machine.
QUIET = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000"}
# Every Ray head node offers this resource. The registry and the ingress reserve no CPU, so Serve would spread
# them over any node; on a worker they die with it, and the gateways lose the replica list (and `agora status`
# its answer) until Serve has restarted them elsewhere and every replica has registered again. The head outlives
# every worker: a cluster ends with it.
ON_HEAD = {"node:__internal_head__": 0.001}


@dataclass(frozen=True)
class ModelDeployment:
    """One model of the app: its engine server's config and how Ray runs its replicas."""

    name: str
    serve: ServeConfig
    replicas: int | None  # a fixed count, or None with min/max
    min_replicas: int | None
    max_replicas: int | None
    num_cpus: float
    num_gpus: float


def deployment_name(model: str) -> str:
    """A Serve deployment name from a model name or path: 'gemma3-270m', '/m/SmolLM2' -> 'SmolLM2'."""
    base = model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base)[:60] or "model"


def model_deployments(serve_config: ServeConfig, cluster: ClusterConfig, replicas: int,
                      specs: list[Any]) -> list[ModelDeployment]:  # fmt: skip
    """The command line's model, or the YAML's ``deployments:`` (each starting from the command line's
    options). ValueError names a bad entry."""
    if not specs:
        name = deployment_name(serve_config.engine.model.model)
        return [ModelDeployment(name, serve_config, None if cluster.min_replicas else replicas, cluster.min_replicas,
                                cluster.max_replicas, cluster.num_cpus_per_replica, cluster.num_gpus_per_replica)]  # fmt: skip
    out: list[ModelDeployment] = []
    for i, spec in enumerate(specs):
        where = f"deployments[{i}]"
        base = dataclasses.replace(serve_config.engine.model, model=spec.model, served_model_name=None)
        config = dataclasses.replace(serve_config, engine=dataclasses.replace(serve_config.engine, model=base))
        config = with_options(config, spec.options, f"{where}.options")
        name = spec.name or deployment_name(spec.model)
        if any(d.name == name for d in out):
            raise ValueError(f"{where}: the deployment name {name!r} is used twice; give each a name")
        auto = spec.min_replicas is not None
        fixed = None if auto else (spec.replicas or replicas)
        out.append(ModelDeployment(
            name, config, fixed, spec.min_replicas, spec.max_replicas,
            cluster.num_cpus_per_replica if spec.num_cpus_per_replica is None else spec.num_cpus_per_replica,
            cluster.num_gpus_per_replica if spec.num_gpus_per_replica is None else spec.num_gpus_per_replica,
        ))  # fmt: skip
    return out


def _engine(d: ModelDeployment, cluster: ClusterConfig, key: str, registry: Any) -> Any:
    threads = str(max(1, int(d.num_cpus)))
    options: dict[str, Any] = {
        "name": d.name,
        "ray_actor_options": {
            "num_cpus": d.num_cpus,
            "num_gpus": d.num_gpus,
            # the engine's torch threads match what Ray reserved; N progress bars in one log are noise
            "runtime_env": {
                "env_vars": {"AGORA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
            },  # fmt: skip
        },
    }
    if d.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "initial_replicas": d.min_replicas,
            "target_ongoing_requests": cluster.target_ongoing_requests,
            "upscale_delay_s": cluster.upscale_delay_s,
            "downscale_delay_s": cluster.downscale_delay_s,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2.0,
            "policy": {"policy_function": POLICY},
        }
    else:
        options["num_replicas"] = d.replicas
    return EngineReplica.options(**options).bind(replica_json(d), key, registry)


def replica_json(d: ModelDeployment) -> str:
    """What a replica starts from: the deployment's config without the clients' key (the replica gets the
    internal key as its own argument; Serve keeps init arguments in its stored deployment config)."""
    return replica_config(d.serve, 0).to_json()


@serve.deployment(name="AgoraApp", num_replicas=1, ray_actor_options={"num_cpus": 0})
class AgoraApp:
    """The application's ingress: the replica list for gateways and `agora status`; with a gateway config
    (KubeRay), it also runs the agora gateway on that config's host and port."""

    def __init__(self, registry: Any, engines: list[Any], key: str, gateway_json: str | None = None) -> None:
        self.registry = registry
        self.engines = engines
        self.key = key
        self.thread: threading.Thread | None = None
        if gateway_json is not None:
            self.thread = threading.Thread(target=self._gateway, args=(gateway_json,), name="agora-gateway",
                                           daemon=True)  # fmt: skip
            self.thread.start()

    async def replicas(self) -> list[dict]:
        return await self.registry.list.remote()

    def _gateway(self, gateway_json: str) -> None:
        from agora.cluster.discovery import RegistryDiscovery
        from agora.router.cli import run_gateway
        from agora.router.config import parse_config

        config = parse_config(json.loads(gateway_json), "gateway")
        run_gateway(config, [], discover=RegistryDiscovery(self.registry, self.key))

    async def check_health(self) -> None:
        if self.thread is not None and not self.thread.is_alive():
            raise RuntimeError("the gateway stopped")


def build(deployments: list[ModelDeployment], cluster: ClusterConfig, key: str,
          gateway_json: str | None = None, gateway_resource: str | None = None) -> Any:  # fmt: skip
    """The application. The registry and the ingress run on the head node; with ``gateway_resource`` the
    ingress (and so the gateway) is placed on the node that offers that custom resource instead (under KubeRay:
    the head pod, where the gateway's Service points)."""
    quiet = {"num_cpus": 0, "resources": ON_HEAD, "runtime_env": {"env_vars": QUIET}}
    registry = Registry.options(ray_actor_options=quiet).bind()
    engines = [_engine(d, cluster, key, registry) for d in deployments]
    ingress = AgoraApp.options(ray_actor_options=quiet)
    if gateway_resource is not None:
        ingress = AgoraApp.options(ray_actor_options={**quiet, "resources": {gateway_resource: 0.01}})
    return ingress.bind(registry, engines, key, gateway_json)


def from_yaml(args: dict[str, str]) -> Any:
    """Serve application builder: ``serve run agora.cluster.app:from_yaml config=agora.yaml``.

    The YAML is the gateway's own file; its ``deployments:`` section lists the models, and the gateway
    (with its ``gateway:`` host, port, key, profile, governance) runs in the ingress replica, on the node
    with the custom resource ``gateway_resource`` if that argument is given. The replicas' internal key
    is made here, once per deploy."""
    from agora.router.config import load_config

    path = args.get("config")
    if not path:
        raise ValueError("give config=PATH: the agora YAML with a deployments: section")
    config = load_config(path)
    if not config.deployments:
        raise ValueError(f"{path}: no deployments: section (the models to serve)")
    cluster = ClusterConfig()
    deployments = model_deployments(ServeConfig(), cluster, 1, config.deployments)
    data = config.model_dump(by_alias=True, exclude_unset=True)
    data.pop("deployments", None)
    data["endpoints"] = []
    return build(deployments, cluster, secrets.token_urlsafe(24), json.dumps(data), args.get("gateway_resource"))
