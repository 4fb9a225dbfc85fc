"""`agora serve` on SIGTERM: requests in flight finish, new ones are refused, and what is still running at the
end of ``--shutdown-timeout`` ends with an error in its API's shape, not a connection cut mid-stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.router.conftest import free_port, requests_in_flight, wait_http


def _serve(model_dir, timeout_s: float) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    port = free_port()
    cmd = [sys.executable, "-m", "agora.cli", "serve", str(model_dir), "--port", str(port), "--served-model-name",
           "tiny", "--kv-cache-memory", "32MiB", "--shutdown-timeout", str(timeout_s)]  # fmt: skip
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=120)
    return proc, url


def _chat(max_tokens: int, stream: bool = True) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
                                    "messages": [{"role": "user", "content": "Tell me a long story."}]}  # fmt: skip


@pytest.mark.timeout(300)
def test_requests_in_flight_finish_and_new_ones_are_refused(tiny_model_dir) -> None:  # noqa: ANN001
    proc, url = _serve(tiny_model_dir, 60)
    try:
        results, done = requests_in_flight(url, [_chat(48)] * 4)
        proc.send_signal(signal.SIGTERM)
        assert done.wait(60)
        for lines in results:  # whole answers: the last chunk says why they stopped, then [DONE]
            assert isinstance(lines, list) and lines[-1] == "[DONE]", lines
            assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        proc.kill()


@pytest.mark.timeout(300)
def test_what_runs_past_the_shutdown_timeout_ends_with_an_error_in_its_api_shape(tiny_long_model_dir) -> None:  # noqa: ANN001
    proc, url = _serve(tiny_long_model_dir, 0)
    try:
        completion = ("/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 4000, "ignore_eos": True,
                                          "stream": True})  # fmt: skip
        results, done = requests_in_flight(url, [_chat(4000), _chat(4000), completion, _chat(4000, stream=False)])
        time.sleep(0.5)  # the whole answer's request reaches the engine
        proc.send_signal(signal.SIGTERM)
        assert done.wait(60)
        *streams, whole = results
        for lines in streams:
            assert isinstance(lines, list) and lines[-1] != "[DONE]", lines
            assert json.loads(lines[-1])["error"]["message"] == "the server is shutting down; retry the request", lines
        assert whole.status_code == 503 and whole.json()["error"]["type"] == "service_unavailable", whole.text
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
