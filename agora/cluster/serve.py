"""`agora serve --ray` and `agora status`: deploy the app, run the gateway over it, show it.

::

    agora serve MODEL --ray [--address auto|HOST:PORT] --replicas N | --min-replicas A --max-replicas B
      ├─ Ray Serve app "agora": Registry, EngineReplica x N (anywhere in the cluster), AgoraApp
      └─ gateway on --host:--port (this process), over the replicas the registry lists

Without ``--address`` a local Ray instance is started on 127.0.0.1 only. Ctrl-C stops the
gateway and deletes the app.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from typing import Any

from agora.cluster import light_local_ray, loopback_only, require_ray
from agora.config import ClusterConfig, ServeConfig

logger = logging.getLogger("agora.cluster")


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray instance that listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    if address is None:  # loopback_only() ran before ray was imported
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)


def serve_ray(config: ServeConfig, cluster: ClusterConfig, replicas: int, profile: str | None,
              router_config: str | None, log_level: str = "warning", db: str | None = None) -> int:  # fmt: skip
    from agora.router.cli import bind_gateway
    from agora.router.config import ConfigError, load_config
    from agora.router.replicas import gateway_config, prepare_model

    try:
        require_ray()
        if cluster.address is None:
            loopback_only()  # a local instance: Ray's ports stay on 127.0.0.1
            light_local_ray()
        from agora.cluster.app import build, model_deployments

        gateway = gateway_config(config, profile, router_config, db)
        specs = load_config(router_config).deployments if router_config else []
        deployments = model_deployments(config, cluster, replicas, specs)
        sock = bind_gateway(gateway)  # taken now: a busy port fails before anything is deployed
        for d in deployments:  # fetched and converted once here; other nodes do it on their first replica
            prepare_model(d.serve.engine.model.model)
    except (ImportError, ConfigError, ValueError, OSError) as exc:
        print(f"agora serve: error: {exc}", file=sys.stderr)
        return 2
    from ray import serve

    from agora.cluster.discovery import RegistryDiscovery
    from agora.router.cli import run_gateway

    connect(cluster.address)
    serve.start(proxy_location="Disabled")  # agora's gateway is the ingress; Serve's HTTP proxy is not needed
    if cluster.app_name in serve.status().applications:  # serve.run would replace it under its gateway
        print(f"agora serve: error: an app named {cluster.app_name!r} already runs on this Ray cluster; stop it "
              "(serve shutdown, or Ctrl-C its agora serve) or pick another --ray-app-name", file=sys.stderr)  # fmt: skip
        return 2
    key = secrets.token_urlsafe(24)  # the replicas refuse anyone without it
    counts = ", ".join(f"{d.name} x {d.replicas or f'{d.min_replicas}..{d.max_replicas}'}" for d in deployments)
    print(f"agora serve: deploying {counts} on Ray (app {cluster.app_name!r})", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        try:
            handle = serve.run(
                build(deployments, cluster, key),
                name=cluster.app_name,
                route_prefix=None,
                logging_config={"enable_access_log": False},
            )  # a line per registry call is noise
        except Exception as exc:  # noqa: BLE001 - a replica that cannot start (bad model, no resources...)
            print(f"agora serve: error: the app did not start: {exc}", file=sys.stderr)
            return 2
        for e in _wait_listed(handle, sum(d.replicas or d.min_replicas or 1 for d in deployments)):
            print(f"agora serve: {e['deployment']} replica {e['replica_id']} on {e['node_ip']} ({e['url']})",
                  file=sys.stderr, flush=True)  # fmt: skip
        print(f"agora serve: ready in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        run_gateway(gateway, [], log_level=log_level, config_path=router_config, sock=sock,
                    discover=RegistryDiscovery(serve.get_deployment_handle("Registry", cluster.app_name), key))  # fmt: skip
    finally:
        serve.delete(cluster.app_name)
        import ray

        ray.shutdown()
    return 0


def _wait_listed(handle: Any, n: int, timeout_s: float = 60.0) -> list[dict]:
    """The registry's entries once ``n`` replicas are listed (serve.run returns when they are built)."""
    deadline = time.monotonic() + timeout_s
    entries: list[dict] = []
    while time.monotonic() < deadline:
        entries = handle.replicas.remote().result()
        if len(entries) >= n:
            break
        time.sleep(0.2)
    return entries


# -- agora status --------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="the replicas of an agora app on Ray: where they run, load, state",
                       description="List the engine replicas of `agora serve --ray`.")  # fmt: skip
    p.add_argument("--address", default="auto", help="the Ray cluster (default: auto, the one on this machine)")
    p.add_argument("--ray-app-name", default=ClusterConfig().app_name, dest="app_name")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def status_rows(entries: list[dict], states: dict[str, dict[str, int]]) -> dict[str, Any]:
    now = time.time()
    replicas = [{"deployment": e["deployment"], "replica": e["replica_id"], "actor": e["actor"], "model": e["model"],
                 "node": e["node_ip"], "node_id": e["node_id"], "url": e["url"], "state": e["state"], "running": e["running"],
                 "waiting": e["waiting"], "kv_usage": round(e["kv_usage"], 4),
                 "up_s": round(now - e["started"], 1)} for e in sorted(entries, key=lambda e: (e["deployment"], e["replica_id"]))]  # fmt: skip
    return {"replicas": replicas, "deployments": states}


def status_main(args: Any) -> int:
    try:
        require_ray()
    except ImportError as exc:
        print(f"agora status: error: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    try:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        print(f"agora status: error: no Ray cluster at {args.address}: {exc}", file=sys.stderr)
        return 2
    app = serve.status().applications.get(args.app_name)
    if app is None:
        print(f"agora status: error: no app {args.app_name!r} on this cluster (is `agora serve --ray` running?)",
              file=sys.stderr)  # fmt: skip
        return 2
    states = {name: {str(k.value if hasattr(k, "value") else k): v for k, v in d.replica_states.items()}
              for name, d in app.deployments.items()}  # fmt: skip
    entries = serve.get_app_handle(args.app_name).replicas.remote().result(timeout_s=10)
    report = status_rows(entries, states)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cols = ("deployment", "replica", "node", "state", "running", "waiting", "kv_usage", "up_s", "url")
    rows = [[str(r[c]) for c in cols] for r in report["replicas"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for name, st in states.items():
        print(f"{name}: " + ", ".join(f"{k.lower()} {v}" for k, v in st.items()))
    return 0
