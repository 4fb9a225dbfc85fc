"""The app as KubeRay deploys it: `agora.cluster.app:from_yaml`, with the gateway inside the ingress
replica (no `agora serve` process), answering on the YAML's port."""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

from agora.cluster.app import from_yaml
from agora.router.replicas import free_port
from tests.cluster.conftest import SERVED, RayCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_from_yaml_runs_the_gateway_in_the_ingress(ray_cluster: RayCluster, tmp_path) -> None:
    from agora.router.replicas import prepare_model

    prepare_model("smollm2-135m-instruct")
    port = free_port()
    path = tmp_path / "agora.yaml"
    path.write_text(f"gateway:\n  host: 127.0.0.1\n  port: {port}\n  scrape_interval_s: 0.2\n"
                    "deployments:\n  - model: smollm2-135m-instruct\n    replicas: 1\n"
                    "    options: {max_model_len: 2048, kv_cache_memory_bytes: 256MiB}\n")  # fmt: skip
    serve.start(proxy_location="Disabled")
    serve.run(from_yaml({"config": str(path)}), name="kuberay", route_prefix=None)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                    "model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # fmt: skip
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the ingress gateway did not answer"
            time.sleep(0.5)
        assert r.headers["x-agora-endpoint"].startswith("smollm2-135m-instruct#")
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    finally:
        serve.delete("kuberay")
