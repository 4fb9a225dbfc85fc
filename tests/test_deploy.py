"""deploy/'s manifests parse, and name the commands, flags, ports and files the code really uses."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from agora.cli import build_parser
from agora.router.config import parse_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _docs(path: Path) -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), path
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _container(workload: dict) -> dict:
    [c] = workload["spec"]["template"]["spec"]["containers"]
    return c


def _parse(command: list[str]):  # noqa: ANN202
    assert command[0] == "agora"
    return build_parser().parse_args(command[1:])  # SystemExit on any flag the CLI does not have


def _port(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def _check_probes_and_scrape(workload: dict, port: int) -> None:
    c = _container(workload)
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": port}
    notes = workload["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"


def test_plain_kubernetes_manifests() -> None:
    docs = _docs(DEPLOY / "k8s" / "agora.yaml")
    engine, gateway = docs[("Deployment", "agora-engine")], docs[("Deployment", "agora-gateway")]

    args = _parse(_container(engine)["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    # the engine ends what is left of its requests before Kubernetes kills it (default grace: 30 s)
    assert engine["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= args.shutdown_timeout_s + 10
    engine_port = _port(_container(engine), "http")
    assert args.port == engine_port
    _check_probes_and_scrape(engine, engine_port)
    env = {e["name"]: e for e in _container(engine)["env"]}
    secret = env["AGORA_API_KEY"]["valueFrom"]["secretKeyRef"]  # the engines' key, from the environment
    assert ("Secret", secret["name"]) in docs

    svc = docs[("Service", "agora-engine")]["spec"]
    assert svc["clusterIP"] == "None"  # headless: DNS lists the pods
    assert svc["selector"] == engine["spec"]["selector"]["matchLabels"]
    assert svc["ports"][0]["targetPort"] == engine_port

    g = _container(gateway)
    gargs = _parse(g["command"])
    assert gargs.command == "route"
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= gargs.shutdown_timeout + 10
    mount = next(m for m in g["volumeMounts"] if gargs.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = docs[("ConfigMap", volume["configMap"]["name"])]
    config = parse_config(yaml.safe_load(cm["data"][Path(gargs.config).name]), "router.yaml")
    gateway_port = _port(g, "http")
    assert config.gateway.port == gateway_port and config.gateway.host == "0.0.0.0"
    _check_probes_and_scrape(gateway, gateway_port)
    [ep] = config.endpoints
    assert ep.discover == "dns" and ep.url == f"http://agora-engine:{svc['ports'][0]['port']}"
    genv = {e["name"]: e for e in g["env"]}
    assert genv[ep.api_key_env]["valueFrom"]["secretKeyRef"] == secret  # the gateway holds the engines' key
    assert docs[("Service", "agora-gateway")]["spec"]["ports"][0]["targetPort"] == gateway_port
    assert config.db.startswith("sqlite:////var/lib/agora/")
    assert any(m["mountPath"] == "/var/lib/agora" for m in g["volumeMounts"])


def test_kuberay_rayservice_builds_the_agora_app(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray.serve")
    docs = _docs(DEPLOY / "kuberay" / "rayservice.yaml")
    service = docs[("RayService", "agora")]["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    [app] = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)  # what Ray Serve imports on the head

    head = service["rayClusterConfig"]["headGroupSpec"]
    c = head["template"]["spec"]["containers"][0]
    mount = next(m for m in c["volumeMounts"] if app["args"]["config"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    text = docs[("ConfigMap", volume["configMap"]["name"])]["data"][Path(app["args"]["config"]).name]
    config = parse_config(yaml.safe_load(text), "agora.yaml")
    assert config.deployments and config.gateway.host == "0.0.0.0"
    assert config.gateway.port == _port(c, "gateway")
    assert docs[("Service", "agora-gateway")]["spec"]["ports"][0]["targetPort"] == config.gateway.port
    labels = head["template"]["metadata"]["labels"]
    assert docs[("Service", "agora-gateway")]["spec"]["selector"].items() <= labels.items()
    resources = yaml.safe_load(yaml.safe_load(head["rayStartParams"]["resources"]))
    assert app["args"]["gateway_resource"] in resources  # the gateway lands on the head, behind the Service

    path = tmp_path / "agora.yaml"
    path.write_text(text)
    built = builder({**app["args"], "config": str(path)})  # the same application, built without a cluster
    assert type(built).__name__ == "Application"


def test_dockerfile_installs_what_the_manifests_run() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and ".[ray,postgres]" in text
    images = {
        _container(d)["image"] for d in _docs(DEPLOY / "k8s" / "agora.yaml").values() if d["kind"] == "Deployment"
    }
    assert images == {"agora:0.1.0"} and "-t agora:0.1.0" in text


# -- Grafana -------------------------------------------------------------------------------------

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMETHEUS_LABELS = {"instance", "job", "le"}  # added by the scrape, or the histogram's own


def _exported() -> dict[str, tuple[str, set[str]]]:
    """Every metric family the gateway and the engine server export: name -> (type, label names)."""
    from agora.engine.engine import EngineStats
    from agora.engine.spec import SpecStats
    from agora.router.config import RouterConfig
    from agora.router.endpoints import Endpoint, EndpointPool
    from agora.router.metrics import GatewayMetrics
    from agora.server.metrics import ServerMetrics

    config = RouterConfig()
    gateway = GatewayMetrics(EndpointPool([Endpoint("a", "http://127.0.0.1:1")], config.gateway.health()),
                             config.build_profile())  # fmt: skip
    gateway.prefix("a", 1, 2)
    engine = ServerMetrics(lambda: EngineStats(spec=SpecStats(1, 3, 2, [1, 1])), "m")
    out: dict[str, tuple[str, set[str]]] = {}
    for registry in (gateway.registry, engine.registry):
        for family in registry.collect():
            # a family built with labels= knows their names even before it has a sample
            labels = {k for s in family.samples for k in s.labels} | set(getattr(family, "_labelnames", ()))
            out[family.name] = (family.type, labels)
    # Labeled counters with no child yet export no sample: their label names come from the objects.
    for metric in vars(gateway).values():
        if hasattr(metric, "_labelnames") and hasattr(metric, "_name"):
            name = metric._name.removesuffix("_total")
            if name in out:
                out[name] = (out[name][0], out[name][1] | set(metric._labelnames))
    return out


def test_grafana_dashboard_queries_only_what_the_code_exports() -> None:
    import json
    import re

    dash = json.loads((DEPLOY / "grafana" / "agora.json").read_text())
    exported = _exported()
    names = re.compile(r"\b((?:vllm|agora)[:_][A-Za-z0-9_:]+)")
    used: set[str] = set()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "endpoint", "model_name"} <= variables
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    for expr in exprs:
        for name in names.findall(expr):
            family = next(((base, kind) for base, (kind, _) in exported.items() for suffix in _SUFFIXES[kind]
                           if name == base + suffix), None)  # fmt: skip
            assert family is not None, f"{name} (in {expr!r}) is not a metric the code exports"
            used.add(family[0])
        # label names in selectors and in by (...) belong to the metric they are applied to
        for name, matchers in re.findall(r"\b((?:vllm|agora)[:_][A-Za-z0-9_:]+)\{([^}]*)\}", expr):
            base = next(b for b in exported if name.startswith(b) and name[len(b):] in ("", "_total", "_bucket",
                                                                                      "_sum", "_count"))  # fmt: skip
            for label in re.findall(r"(\w+)\s*=~?", matchers):
                assert label in exported[base][1] | _PROMETHEUS_LABELS, f"{name} has no label {label!r}"
        for labels, name in re.findall(r"by \(([\w, ]+)\) \((?:rate|increase)?\(?((?:vllm|agora)[:_][\w:]+)", expr):
            base = next(b for b in exported if name.startswith(b) and name[len(b):] in ("", "_total", "_bucket",
                                                                                      "_sum", "_count"))  # fmt: skip
            for label in labels.split(","):
                assert label.strip() in exported[base][1] | _PROMETHEUS_LABELS, f"{name} has no label {label!r}"
    # the dashboard covers the gateway and the engines alike
    assert {
        "agora_gateway_requests",
        "agora_gateway_endpoint_healthy",
        "agora_gateway_tenant_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
    } <= used
