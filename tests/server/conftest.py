"""A real HTTP server (uvicorn in a thread) over a tiny model, per configuration."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from agora.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig, StructuredOutputsConfig
from agora.engine.async_engine import AsyncEngine
from agora.engine.engine import Engine
from agora.engine.scheduler import SchedulerConfig
from agora.server.app import build_app

MODEL = "tiny"


@dataclass
class Running:
    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics").text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + "{") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"metric {name} {labels} not exported"
        return total

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("vllm:num_requests_running") == 0 and self.metric("vllm:kv_cache_usage_perc") == 0:
                return
            time.sleep(0.05)
        raise AssertionError("the engine did not become idle")


def start_server(model_dir, max_waiting: int = 64, max_num_seqs: int = 16, max_body: int = 1 << 20,
                 api_key: str | None = None, structured: StructuredOutputsConfig | None = None,
                 served_model_name: str = MODEL, tool_call_parser: str | None = None,
                 responses_store: str | None = None, model_aliases: tuple = (),
                 engine_client=None, speculative_config="auto",
                 scheduling_policy: str = "fcfs", reasoning_parser: str = "auto") -> Running:  # noqa: ANN001  # fmt: skip
    """A real server over the model; ``engine_client(config)`` gives it another EngineClient than AsyncEngine."""
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), served_model_name=served_model_name, dtype="float32"),
        cache=CacheConfig(block_size=16, num_blocks=512),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=512, scheduling_policy=scheduling_policy
        ),  # fmt: skip
        max_waiting_requests=max_waiting,
        structured=structured or StructuredOutputsConfig(),
        speculative_config=speculative_config,
    )
    if engine_client is not None:
        async_engine = engine_client(config)
    else:
        async_engine = AsyncEngine(lambda: Engine(config), max_waiting)  # built in its thread, as `agora serve` does
    engine = getattr(async_engine, "engine", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(async_engine, ServerConfig(port=port, max_body_bytes=max_body, api_key=api_key,
                                               tool_call_parser=tool_call_parser, responses_store=responses_store,
                                               model_aliases=model_aliases,
                                               reasoning_parser=reasoning_parser))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return Running(url, engine, server, thread)
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def stop_server(r: Running) -> None:
    r.server.should_exit = True
    r.thread.join(15)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    r = start_server(tiny_model_dir)
    yield r
    stop_server(r)
