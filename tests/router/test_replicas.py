"""`agora serve --replicas 2` with real engine processes on a tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from agora.cli import build_parser, serve_config
from agora.router.replicas import gateway_config, replica_config
from tests.router.conftest import free_port, metric, wait_http


def test_replicas_start_from_the_serve_config_without_its_key() -> None:
    from agora.config import ServeConfig

    args = _serve_args(["m", "--replicas", "2", "--port=8000", "--host", "0.0.0.0", "--max-num-seqs", "8",
                        "--api-key", "k", "--router-profile", "round-robin", "--db", "sqlite:///g.db",
                        "--no-enable-prefix-caching", "--model-alias", "claude-*=m"])  # fmt: skip
    serve = serve_config(args)
    child = ServeConfig.from_json(replica_config(serve, 9001).to_json())
    assert child.server.host == "127.0.0.1" and child.server.port == 9001 and child.server.api_key is None
    assert child.engine == serve.engine and child.engine.scheduler.max_num_seqs == 8
    assert not child.engine.cache.enable_prefix_caching and child.server.model_aliases == (("claude-*", "m"),)
    gateway = gateway_config(serve, args.router_profile, None, args.db)
    assert (gateway.gateway.host, gateway.gateway.port, gateway.gateway.api_key) == ("0.0.0.0", 8000, "k")
    assert gateway.profile == "round-robin" and gateway.db == "sqlite:///g.db"
    # a replica reads the JSON back, and takes its key from the environment (argv is visible in `ps`)
    again = serve_config(_serve_args(["--serve-config", child.to_json(), "--api-key", "internal"]))
    assert again.engine == serve.engine and again.server.api_key == "internal" and again.server.port == 9001


def _serve_args(argv: list[str]):  # noqa: ANN202
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.timeout(300)
def test_two_engine_replicas_behind_the_gateway(tiny_model_dir, tmp_path) -> None:
    port = free_port()
    router = tmp_path / "router.yaml"
    router.write_text("gateway:\n  seed: 0\n  scrape_interval_s: 0.1\n")  # seeded tie-breaks: a fixed spread
    cmd = [sys.executable, "-m", "agora.cli", "serve", str(tiny_model_dir), "--replicas", "2", "--port", str(port),
           "--served-model-name", "tiny", "--kv-cache-memory", "32MiB", "--router-config", str(router)]  # fmt: skip
    # the key from the environment, starting with "-" as secrets.token_urlsafe's keys sometimes do
    parent = subprocess.Popen(cmd, env={**os.environ, "AGORA_LOG_LEVEL": "INFO", "AGORA_API_KEY": "-k1"})
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer -k1"}
    try:
        wait_http(f"{url}/health", timeout=180)
        deadline = time.monotonic() + 120
        while metric(url, "agora_gateway_endpoint_healthy") < 2:  # both replicas up, not just the first
            assert time.monotonic() < deadline, "a replica did not come up"
            time.sleep(0.1)
        children = psutil.Process(parent.pid).children()
        assert len(children) == 2
        assert not any("--api-key" in c.cmdline() for c in children)  # the internal key is not in `ps`
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"

        def turn(history: list[dict]) -> httpx.Response:
            body = {"model": "tiny", "messages": history, "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            return r

        histories = [[{"role": "user", "content": f"Agent {i}. " + "The quick brown fox jumps. " * 12}]
                     for i in range(4)]  # fmt: skip
        first = []
        for h in histories:
            r = turn(h)
            first.append(r.headers["x-agora-endpoint"])
            h += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "Hello world! " * 6}]  # fmt: skip
        assert set(first) == {"replica-0", "replica-1"}
        for h, where in zip(histories, first, strict=True):
            r = turn(h)
            assert r.headers["x-agora-endpoint"] == where  # the conversation went back to its KV cache
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32

        # the replicas only take the gateway's internal key
        replica_ports = [
            c.laddr.port for p in children for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
        ]
        for p in replica_ports:
            assert httpx.get(f"http://127.0.0.1:{p}/v1/models", headers=auth).status_code == 401

        killed = children[0]
        killed.kill()  # a replica dies: the next requests still succeed, on the other one
        for h in histories:
            turn(h)
        # ... and it is restarted, ejected while it loads, and probed back in. Until the gateway has ejected it the
        # healthy gauge still counts it, so the gauge alone would let this loop end before the restart.
        deadline = time.monotonic() + 120
        while True:
            children = psutil.Process(parent.pid).children()
            restarted = len(children) == 2 and killed.pid not in {c.pid for c in children}
            ejected = metric(url, "agora_gateway_ejections_total") >= 1
            if restarted and ejected and metric(url, "agora_gateway_endpoint_healthy") == 2:
                break
            assert time.monotonic() < deadline, f"the killed replica did not come back ({restarted=}, {ejected=})"
            time.sleep(0.2)
    finally:
        parent.send_signal(signal.SIGINT)
        try:
            parent.wait(60)
        except subprocess.TimeoutExpired:
            parent.kill()
            raise
    for c in children:
        assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE
