"""Tenants do not share what they sent: with the real SmolLM2 behind `agora serve --db`, a prompt
one tenant sent is in its prefix cache only (a timing probe), and stored responses belong to their key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from agora.router.replicas import free_port
from tests.router.conftest import wait_http

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


def _key(db: str, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "agora.cli", "keys", "create", "--db", db, "--tenant", tenant,
                          "--json"], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout)["key"]


def _ttft(url: str, key: str, prompt: str) -> float:
    t = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t
    raise AssertionError("no token")


def test_prefix_cache_and_stored_responses_are_per_tenant(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'gov.db'}"
    a, b = _key(db, "tenant-a"), _key(db, "tenant-b")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agora.cli", "serve", MODEL, "--port", str(port), "--db", db,
                             "--responses-store", str(tmp_path / "responses.db")],
                            env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=300)
        words = " ".join(f"item{i} costs {i * 7 % 13} coins;" for i in range(120))  # ~1,060 tokens: 3 s cold
        _ttft(url, a, "Warm up.")
        cold = _ttft(url, a, words)
        warm = min(_ttft(url, a, words) for _ in range(3))
        other = min(_ttft(url, b, words) for _ in range(1))
        assert warm < cold / 3, (cold, warm)  # the prefix cache works for the tenant that sent it
        assert other > 3 * warm, (cold, warm, other)  # and does nothing for another tenant
        # stored responses: the key that made one sees it, another key gets a 404
        made = httpx.post(f"{url}/v1/responses", headers={"authorization": f"Bearer {a}"}, timeout=120,
                          json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}).json()  # fmt: skip
        assert (
            httpx.get(f"{url}/v1/responses/{made['id']}", headers={"authorization": f"Bearer {a}"}).status_code == 200
        )
        assert (
            httpx.get(f"{url}/v1/responses/{made['id']}", headers={"authorization": f"Bearer {b}"}).status_code == 404
        )
    finally:
        proc.terminate()
        proc.wait(60)
