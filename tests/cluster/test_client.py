"""The HTTP server over an engine in a Ray actor (`RayEngineClient`) answers as over the in-process
engine: the same greedy tokens and logprobs, the same streams, constraints and errors."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.cluster.conftest import RayCluster
from tests.server.conftest import MODEL, Running, start_server, stop_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def servers(ray_cluster: RayCluster, tiny_model_dir):  # noqa: ANN001, ANN201
    from agora.cluster.client import RayEngineClient

    local = start_server(tiny_model_dir)
    remote = start_server(tiny_model_dir, engine_client=lambda config: RayEngineClient.start(config, num_cpus=0))
    yield local, remote
    stop_server(remote)
    stop_server(local)


def _post(r: Running, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{r.url}{path}", json={"model": MODEL, **body}, timeout=60)


def test_same_answers_as_the_in_process_engine(servers) -> None:  # noqa: ANN001
    local, remote = servers
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}  # fmt: skip
    a, b = _post(local, "/v1/chat/completions", chat), _post(remote, "/v1/chat/completions", chat)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"] == b.json()["choices"] and a.json()["usage"] == b.json()["usage"]

    comp = {"prompt": "one two three", "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 7, "logprobs": 1,
            "bad_words": ["four"], "return_token_ids": True}  # fmt: skip
    a, b = _post(local, "/v1/completions", comp), _post(remote, "/v1/completions", comp)
    assert a.json()["choices"] == b.json()["choices"]

    def streamed(r: Running) -> list[str]:
        with httpx.stream("POST", f"{r.url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, **chat, "stream": True}) as resp:  # fmt: skip
            return [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    for line in resp.iter_lines() if line.startswith("data: {")]  # fmt: skip

    assert streamed(local) == streamed(remote)

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    structured = {"messages": [{"role": "user", "content": "a number"}], "max_tokens": 20, "temperature": 0,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}  # fmt: skip
    a, b = _post(local, "/v1/chat/completions", structured), _post(remote, "/v1/chat/completions", structured)
    assert b.status_code == 200 and a.json()["choices"] == b.json()["choices"]
    json.loads(b.json()["choices"][0]["message"]["content"])


def test_same_errors_before_any_output(servers) -> None:  # noqa: ANN001
    local, remote = servers
    for body in ({"prompt": "x", "max_tokens": 10**6}, {"prompt": [10**7], "max_tokens": 2},
                 {"prompt": "x", "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
                     "name": "bad", "schema": {"type": "object", "minProperties": "many"}}}},
                 {"prompt": "x", "max_tokens": 2, "priority": 3},  # fcfs
                 {"prompt": "x", "max_tokens": 2, "bad_words": [f"xyzzy{i} " * 40 for i in range(128)]}):  # fmt: skip
        a, b = _post(local, "/v1/completions", body), _post(remote, "/v1/completions", body)
        assert a.status_code == b.status_code == 400, (a.text, b.text)
        assert a.json()["error"]["param"] == b.json()["error"]["param"]
    assert httpx.get(f"{remote.url}/health").status_code == 200
    ids = [[m["id"] for m in httpx.get(f"{r.url}/v1/models").json()["data"]] for r in (local, remote)]
    assert ids[0] == ids[1]
