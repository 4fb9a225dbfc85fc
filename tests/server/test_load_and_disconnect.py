"""Disconnects abort and free KV blocks; a full queue answers 429 fast; /metrics counts."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.server.conftest import start_server, stop_server


def assert_one_more_abort(server, before: float) -> None:
    """The server counts exactly one more aborted request (within 10 s), then goes idle with no KV held."""
    deadline = time.monotonic() + 10
    while server.metric("agora:requests_aborted_total") == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("agora:requests_aborted_total") == before + 1
    server.wait_idle()


LONG = {"prompt": "Hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True}


def test_streaming_disconnect_aborts_and_frees_kv(server):
    aborted = server.metric("agora:requests_aborted_total")
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # first token arrived: hang up
    assert_one_more_abort(server, aborted)


def test_non_streaming_disconnect_aborts_and_frees_kv(server):
    aborted = server.metric("agora:requests_aborted_total")
    body = {**LONG, "n": 16}  # long enough (about a second) to still run when the client hangs up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    assert_one_more_abort(server, aborted)


def test_full_waiting_queue_answers_429_fast(tiny_model_dir):
    r = start_server(tiny_model_dir, max_waiting=1, max_num_seqs=1)
    try:

        def call(_: int) -> tuple[int, float, httpx.Response]:
            t0 = time.monotonic()
            resp = httpx.post(f"{r.url}/v1/completions", json=LONG, timeout=60)
            return resp.status_code, time.monotonic() - t0, resp

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        codes = [c for c, _, _ in results]
        assert 200 in codes and 429 in codes, codes
        assert set(codes) <= {200, 429}
        for code, elapsed, resp in results:
            if code == 429:
                assert elapsed < 2.0
                assert resp.headers["retry-after"] == "1"
                assert "capacity" in resp.json()["error"]["message"]
        assert r.metric("agora:requests_rejected_total", 'status="429"') == codes.count(429)
        r.wait_idle()
    finally:
        stop_server(r)


def test_metrics_count_what_happened(server):
    server.wait_idle()
    before = {
        name: server.metric(name)
        for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                     "vllm:prefix_cache_hits_total", "vllm:e2e_request_latency_seconds_count",
                     "vllm:time_to_first_token_seconds_count")
    }  # fmt: skip
    length_before = server.metric("vllm:request_success_total", 'finished_reason="length"')
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    n_prompt = len(httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"])
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                             "ignore_eos": True}, timeout=30)  # fmt: skip
        assert r.status_code == 200
    assert server.metric("vllm:prompt_tokens_total") - before["vllm:prompt_tokens_total"] == 2 * n_prompt
    assert server.metric("vllm:generation_tokens_total") - before["vllm:generation_tokens_total"] == 10
    assert server.metric("vllm:prefix_cache_queries_total") - before["vllm:prefix_cache_queries_total"] == 2 * n_prompt
    hits = server.metric("vllm:prefix_cache_hits_total") - before["vllm:prefix_cache_hits_total"]
    assert hits == (n_prompt - 1) // 16 * 16  # the second request hits every full block but the last token's
    assert (
        server.metric("vllm:e2e_request_latency_seconds_count") - before["vllm:e2e_request_latency_seconds_count"] == 2
    )
    assert (
        server.metric("vllm:time_to_first_token_seconds_count") - before["vllm:time_to_first_token_seconds_count"] == 2
    )
    assert server.metric("vllm:request_success_total", 'finished_reason="length"') - length_before == 2
    assert server.metric("vllm:inter_token_latency_seconds_count") > 0
    assert server.metric("vllm:num_requests_waiting") == 0
