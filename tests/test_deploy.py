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
