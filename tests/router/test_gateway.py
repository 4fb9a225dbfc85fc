"""The gateway as users run it: `agora route` in its own process over fake OpenAI servers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.router.conftest import Procs, metric, metric_when, requests_in_flight


def chat(url: str, content: str, model: str = "m", stream: bool = False, **kw) -> httpx.Response:  # noqa: ANN003
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, **kw)


def answered_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def endpoints(*fakes) -> list[dict]:  # noqa: ANN002
    return [{"url": f.url + "/v1", "name": name} for name, f in fakes]


def test_routes_by_model_and_lists_the_union(procs: Procs) -> None:
    a = procs.fake("a", ("m1",), flags=("--max-model-len", "2048"))
    b = procs.fake("b", ("m1", "m2"), flags=("--max-model-len", "8192"))
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b))})
    models = httpx.get(f"{gw.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m1", "m2"]
    # the context a request can count on wherever it goes: the smallest of the endpoints serving the model
    assert [m["max_model_len"] for m in models["data"]] == [2048, 8192]
    assert httpx.get(f"{gw.url}/v1/models/m2").json()["id"] == "m2"
    assert httpx.get(f"{gw.url}/v1/models/m3").status_code == 404
    for i in range(6):
        resp = chat(gw.url, f"question {i}", model="m2")
        assert answered_by(resp) == "b" and resp.headers["x-agora-endpoint"] == "b"
        assert resp.headers["x-agora-scores"].startswith("b=")  # a does not serve m2: not a candidate
    resp = chat(gw.url, "hi", model="m3")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found" and "m1, m2" in resp.json()["error"]["message"]


def test_prefix_aware_sticks_and_round_robin_alternates(procs: Procs) -> None:
    a, b = procs.fake("a"), procs.fake("b")
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b))})
    histories = [f"conversation {i}: " + f"context {i} " * 40 for i in range(6)]
    first = [answered_by(chat(gw.url, h)) for h in histories]
    assert set(first) == {"a", "b"}  # new conversations spread out
    for _ in range(3):  # later turns extend the history and return where it was sent
        histories = [h + " tool result: ok " * 10 for h in histories]
        assert [answered_by(chat(gw.url, h)) for h in histories] == first
    assert metric(gw.url, "agora_gateway_prefix_hit_ratio") > 0.5

    rr = procs.gateway({"endpoints": endpoints(("a", a), ("b", b)), "profile": "round-robin"})
    assert [answered_by(chat(rr.url, histories[0])) for _ in range(4)] == ["a", "b", "a", "b"]


def test_session_header_sticks(procs: Procs) -> None:
    a, b = procs.fake("a"), procs.fake("b")
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b))})
    first = answered_by(chat(gw.url, "start", headers={"x-session-id": "s1"}))
    for i in range(8):  # different prompts every time: only the session ties them
        assert answered_by(chat(gw.url, f"unrelated {i}", headers={"x-session-id": "s1"})) == first


def test_streams_chunk_by_chunk(procs: Procs) -> None:
    a = procs.fake("a", tokens=6, delay_ms=150)
    gw = procs.gateway({"endpoints": endpoints(("a", a))})
    start = time.monotonic()
    arrivals = []
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 7  # 6 chunks and [DONE]
    assert arrivals[0] < 0.5 * arrivals[-1]  # the first chunk was not held back until the end


def test_client_closing_after_done_is_a_complete_request(procs: Procs) -> None:
    """OpenAI's clients stop reading at `data: [DONE]` and close; a backend may end its body
    later. The answer was whole: it counts as served, not as a disconnect."""
    a = procs.fake("a", tokens=3, flags=("--done-linger-ms", "2000"))
    gw = procs.gateway({"endpoints": endpoints(("a", a))})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
            received = b""
            for piece in r.iter_raw():
                received += piece
                if received.endswith(b"data: [DONE]\n\n"):
                    break  # the event is whole only with its blank line, even when it came in two pieces
            assert received.endswith(b"data: [DONE]\n\n")
    assert metric_when(gw.url, "agora_gateway_requests_total", 'code="200",endpoint="a"', want=2) == 2
    assert metric(gw.url, "agora_gateway_client_disconnects_total") == 0
    # the in-flight count drops only after the relay has counted the request
    assert metric_when(gw.url, "agora_gateway_endpoint_in_flight", 'endpoint="a"', want=0) == 0


def test_client_disconnect_cancels_upstream(procs: Procs) -> None:
    a = procs.fake("a", tokens=100, delay_ms=100)
    gw = procs.gateway({"endpoints": endpoints(("a", a))})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        assert a.stats()["running"] == 1
    deadline = time.monotonic() + 5
    while a.stats()["aborted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.stats()["aborted"] == 1 and a.stats()["running"] == 0
    assert metric_when(gw.url, "agora_gateway_client_disconnects_total", want=1) == 1
    assert metric_when(gw.url, "agora_gateway_endpoint_in_flight", 'endpoint="a"', want=0) == 0


def test_5xx_is_retried_elsewhere_then_ejected_and_probed_back(procs: Procs) -> None:
    a, b = procs.fake("a"), procs.fake("b")
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b)), "profile": "round-robin",
                        "gateway": {"eject_after_failures": 3, "eject_backoff_s": 5.0}})  # fmt: skip
    a.mode("error500")
    answers = [answered_by(chat(gw.url, f"q{i}")) for i in range(8)]
    assert answers == ["b"] * 8  # no client saw a 500
    assert a.stats()["failed"] == 3  # then it was ejected and no longer tried
    assert metric(gw.url, "agora_gateway_retries_total", 'endpoint="a"') == 3
    assert metric(gw.url, "agora_gateway_ejections_total", 'endpoint="a"') == 1
    assert metric(gw.url, "agora_gateway_endpoint_healthy", 'endpoint="a"') == 0
    a.mode("ok")  # the back-off (5 s, longer than the 8 requests above take even on a busy machine) ends
    deadline = time.monotonic() + 20
    while metric(gw.url, "agora_gateway_endpoint_healthy", 'endpoint="a"') == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {answered_by(chat(gw.url, f"r{i}")) for i in range(4)} == {"a", "b"}


def test_a_5xx_whose_body_breaks_off_is_retried_too(procs: Procs) -> None:
    a, b = procs.fake("a"), procs.fake("b")
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b)), "profile": "round-robin",
                        "gateway": {"eject_after_failures": 5}})  # fmt: skip
    a.mode("error500_cut")
    assert [answered_by(chat(gw.url, f"q{i}")) for i in range(4)] == ["b"] * 4
    failed = a.stats()["failed"]  # each time a was tried, its broken error was read as far as it came
    assert failed >= 1 and metric(gw.url, "agora_gateway_retries_total", 'endpoint="a"') == failed  # then retried


def test_failover_when_an_endpoint_dies_mid_run(procs: Procs) -> None:
    a, b = procs.fake("a", delay_ms=20), procs.fake("b", delay_ms=20)
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b)), "profile": "round-robin"})
    done = threading.Event()
    count = {"n": 0}

    def one(i: int) -> int:
        resp = chat(gw.url, f"q{i}")
        count["n"] += 1
        if count["n"] == 10:
            done.set()
        return resp.status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(40)]
        done.wait(30)
        a.kill()  # requests in flight there had not started answering: they are retried on b
        codes = [f.result() for f in futures]
    assert codes == [200] * 40
    assert metric(gw.url, "agora_gateway_endpoint_healthy", 'endpoint="a"') == 0


def test_broken_stream_is_not_retried_and_ends_with_an_error_event(procs: Procs) -> None:
    import openai

    a = procs.fake("a", tokens=5)
    b = procs.fake("b", tokens=5)
    gw = procs.gateway({"endpoints": endpoints(("a", a), ("b", b)), "profile": "round-robin"})
    a.mode("break")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.headers["x-agora-endpoint"] == "a"
        lines = [line for line in r.iter_lines() if line]
    last = json.loads(lines[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_error" and "stopped mid-answer" in last["error"]["message"]
    assert "data: [DONE]" not in lines  # it does not look like a complete answer
    assert b.stats()["prompts"] == []  # nothing was sent twice
    assert metric(gw.url, "agora_gateway_endpoint_errors_total", 'kind="stream"') == 1
    b.mode("break")  # wherever the next one goes
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="stopped mid-answer"):  # the SDK raises it: a clean error
        for _ in client.chat.completions.create(model="m", messages=body["messages"], stream=True):
            pass


def test_503_fast_when_nothing_is_healthy(procs: Procs) -> None:
    from tests.router.conftest import free_port

    gw = procs.gateway({"endpoints": [{"url": f"http://127.0.0.1:{free_port()}", "models": ["m"]}]}, wait=False)
    t = time.monotonic()
    resp = chat(gw.url, "hi")
    assert time.monotonic() - t < 1.0
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_endpoint"
    assert httpx.get(f"{gw.url}/health").status_code == 503


def test_429_when_every_endpoint_is_saturated(procs: Procs) -> None:
    a = procs.fake("a", tokens=50, delay_ms=100)
    gw = procs.gateway({"endpoints": endpoints(("a", a)), "gateway": {"max_in_flight_per_endpoint": 1}})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: a dropped line iterator closes the response
        next(lines)
        t = time.monotonic()
        resp = chat(gw.url, "one more")
        assert time.monotonic() - t < 1.0
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "rate_limit_error"
    assert metric(gw.url, "agora_gateway_rejected_total", 'code="429"') == 1


def test_bad_requests_and_api_key(procs: Procs) -> None:
    a = procs.fake("a")
    gw = procs.gateway({"endpoints": endpoints(("a", a)), "gateway": {"api_key": "sekret", "max_body_bytes": 4096}})
    auth = {"Authorization": "Bearer sekret"}
    assert chat(gw.url, "hi").status_code == 401
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401
    assert answered_by(chat(gw.url, "hi", headers=auth)) == "a"
    assert a.stats()["prompts"] == [[{"role": "user", "content": "hi"}]]  # the gateway's key is not passed on
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=b"{nope", headers=auth)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json=[1], headers=auth)
    assert resp.status_code == 400
    form = {**auth, "content-type": "application/x-www-form-urlencoded"}  # curl -d without -H
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=b'{"model": "m", "messages": []}', headers=form)
    assert resp.status_code == 415 and "content-type: application/json" in resp.json()["error"]["message"]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": 3}, headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=b'{"a": ' + b"[" * 1500 + b"]" * 1500 + b"}",
                      headers=auth)  # fmt: skip
    assert resp.status_code == 400 and "nests too deeply" in resp.json()["error"]["message"]
    half_emoji = b'{"model": "m", "messages": [{"role": "user", "content": "cut \\ud83d"}]}'
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=half_emoji, headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages.0.content", resp.text
    assert len(a.stats()["prompts"]) == 1  # refused here: nothing was forwarded
    resp = chat(gw.url, "x" * 5000, headers=auth)
    assert resp.status_code == 413

    def chunked():  # noqa: ANN202 - no declared length: the limit still holds
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        yield b"y" * 5000
        yield b'"}]}'

    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=chunked(), headers=auth)
    assert resp.status_code == 413
    assert httpx.get(f"{gw.url}/nowhere").status_code == 404


def test_route_cli_errors() -> None:
    run = [sys.executable, "-m", "agora.cli", "route"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no endpoints" in out.stderr
    out = subprocess.run([*run, "--endpoint", "http://127.0.0.1:1", "--profile", "fastest"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "profile: no profile named 'fastest'" in out.stderr


def test_gateway_never_imports_torch_the_engine_or_the_server() -> None:
    code = ("import sys, agora.cli, agora.config, agora.router.gateway, agora.router.cli, agora.router.replicas, "
            "agora.openai.stream, agora.cluster.serve, agora.cluster.discovery, "
            "agora.openai.accumulate, agora.openai.tool_parsers; bad = [m for m in sys.modules if m in ('torch', 'transformers', 'ray') or "
            "m.startswith(('agora.engine', 'agora.server', 'agora.models.')) and m != 'agora.models.catalog']; "
            "print(bad); sys.exit(bool(bad))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _stream_body(path: str, model: str = "m") -> tuple[str, dict]:
    if path == "/v1/completions":
        return path, {"model": model, "prompt": "hi", "stream": True}
    return path, {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.timeout(120)
def test_sigterm_lets_requests_in_flight_finish(procs: Procs) -> None:
    a = procs.fake("a", tokens=30, delay_ms=50)  # 1.5 s a stream
    gw = procs.gateway({"endpoints": endpoints(("a", a))})
    results, done = requests_in_flight(gw.url, [_stream_body("/v1/chat/completions")] * 3)
    gw.proc.send_signal(signal.SIGTERM)
    assert done.wait(30)
    for lines in results:
        assert isinstance(lines, list) and lines[-1] == "[DONE]", lines
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "stop"
    assert gw.proc.wait(15) in (0, -signal.SIGTERM)
    assert a.stats()["served"] == 3 and a.stats()["aborted"] == 0


@pytest.mark.timeout(120)
def test_sigterm_ends_what_outlasts_the_drain_in_its_api_shape(procs: Procs) -> None:
    import openai

    a = procs.fake("a", tokens=1000, delay_ms=50)  # 50 s a stream, or a whole answer
    gw = procs.gateway({"endpoints": endpoints(("a", a)), "gateway": {"shutdown_timeout_s": 1}})
    whole = ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    responses = ("/v1/responses", {"model": "m", "input": "hi", "stream": True})
    results, done = requests_in_flight(gw.url, [_stream_body("/v1/chat/completions"),
                                                _stream_body("/v1/completions"), whole, responses])  # fmt: skip
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    sdk_stream = client.chat.completions.create(model="m", messages=whole[1]["messages"], stream=True)
    next(iter(sdk_stream))
    assert metric_when(gw.url, "agora_gateway_endpoint_in_flight", 'endpoint="a"', want=5) == 5
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="the server is shutting down; retry the request"):
        for _ in sdk_stream:  # the SDK raises the error event: the stream did not just stop
            pass
    assert done.wait(30)
    chat_lines, completion_lines, answer, response_events = results
    last = json.loads(response_events[-1])  # the Responses API's error event, numbered after what came before
    assert last["type"] == "error" and last["message"] == "the server is shutting down; retry the request"
    assert last["sequence_number"] == json.loads(response_events[-2])["sequence_number"] + 1 > 2
    for lines in (chat_lines, completion_lines):
        assert isinstance(lines, list) and "[DONE]" not in lines, lines
        error = json.loads(lines[-1])["error"]
        assert error == {"message": "the server is shutting down; retry the request", "type": "server_error",
                         "param": None, "code": "shutting_down"}  # fmt: skip
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["type"] == "service_unavailable" and answer.json()["error"]["code"] == "shutting_down"
    assert gw.proc.wait(15) in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < 10  # the drain's second, not uvicorn's margin
    deadline = time.monotonic() + 5  # the endpoint saw each stream's client go: their work stopped
    while a.stats()["aborted"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.stats()["aborted"] == 3


async def test_an_unexpected_error_is_a_json_500_in_the_api_shape(procs: Procs) -> None:
    from agora.router.config import parse_config
    from agora.router.gateway import Gateway

    a = procs.fake("a")
    gw = Gateway(parse_config({"endpoints": endpoints(("a", a))}, "test"))
    await gw.startup()
    forward = gw.pipeline.forward

    async def broken(ctx) -> None:  # noqa: ANN001 - a bug somewhere past admission
        if ctx.data.get("max_tokens") == 13:
            raise RuntimeError("a bug")
        await forward(ctx)

    gw.pipeline.forward = broken
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw") as client:
            body = {"model": "m", "max_tokens": 13, "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 500 and r.json()["error"] == {"message": "internal gateway error",
                                                                  "type": "internal_error", "param": None,
                                                                  "code": None}  # fmt: skip
            r = await client.post("/v1/messages", json=body)
            assert r.status_code == 500 and r.json()["type"] == "error"  # Anthropic's shape
            body["max_tokens"] = 5
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200  # still serving
    finally:
        await gw.shutdown()


def test_pages_of_other_sites_and_allowed_origins(procs: Procs) -> None:
    a = procs.fake("a")
    gw = procs.gateway({"endpoints": endpoints(("a", a)),
                        "gateway": {"allowed_origins": ["http://localhost:3000"], "client_timeout_s": 1}})  # fmt: skip
    # an open gateway's admin API is open to this machine, and so to any page its browser opens: not to them
    evil = {"origin": "https://evil.example", "content-type": "text/plain"}
    r = httpx.post(f"{gw.url}/admin/keys", content=b'{"name": "x"}', headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert httpx.get(f"{gw.url}/admin/keys").json()["data"] == []  # no key was made: the gateway stays open
    assert chat(gw.url, "hi", headers={"origin": "https://evil.example"}).status_code == 403
    page = {"origin": "http://localhost:3000"}
    preflight = httpx.options(f"{gw.url}/v1/chat/completions", headers={**page,
                              "access-control-request-method": "POST", "access-control-request-headers": "authorization"})  # fmt: skip
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = chat(gw.url, "hi", headers=page)
    assert answered_by(r) == "a" and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-agora-endpoint" in r.headers["access-control-expose-headers"]
    # what the HTTP layer refused before the gateway saw it is counted: the two pages, and a head that never ended
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10) as stalled:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        assert stalled.recv(65536).startswith(b"HTTP/1.1 408 ")
    refused = "agora_gateway_http_refused_total"
    assert metric(gw.url, refused, 'reason="origin_not_allowed"') == 2
    assert metric(gw.url, refused, 'reason="request_timeout"') == 1
    assert metric(gw.url, refused, 'reason="request_header_fields_too_large"') == 0
