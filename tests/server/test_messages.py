"""The Anthropic Messages API, checked with the official anthropic client: create, stream, forced
tool_use, tool_result round trips, count_tokens, output_config, Anthropic's error shape and its
x-api-key header, model aliases as agents send them."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")

TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY = {"temperature": 0}  # Anthropic's default is 1; today's client sends no temperature, the API still takes it


@pytest.fixture(scope="module")
def server(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir, api_key="k1", model_aliases=(("claude-*", MODEL),))
    yield r
    stop_server(r)


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="k1", max_retries=0)


def test_create_and_stream_agree(client) -> None:
    kw = dict(model="claude-sonnet-4-5", max_tokens=6, messages=[{"role": "user", "content": "Hello"}],
              system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], extra_body=GREEDY)  # fmt: skip
    whole = client.messages.create(**kw)
    assert whole.type == "message" and whole.role == "assistant" and whole.stop_reason == "max_tokens"
    assert whole.usage.output_tokens == 6 and whole.content[0].type == "text"
    with client.messages.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    body = {**{k: v for k, v in kw.items() if k != "extra_body"}, **GREEDY, "stream": True}
    raw = httpx.post(f"{client.base_url}/v1/messages", json=body, headers={"x-api-key": "k1"}, timeout=60).text
    assert "event: ping" in raw and raw.index("event: message_start") < raw.index("event: ping")


def test_forced_tool_use_and_its_result(client) -> None:
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        out = client.messages.create(model=MODEL, max_tokens=300, messages=ASK, tools=TOOLS, tool_choice=choice,
                                     extra_body=GREEDY)  # fmt: skip
        uses = [b for b in out.content if b.type == "tool_use"]
        assert out.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
        assert isinstance(uses[0].input["city"], str)
    with client.messages.stream(model=MODEL, max_tokens=300, messages=ASK, tools=TOOLS, tool_choice=choice,
                                extra_body=GREEDY) as s:  # fmt: skip
        streamed = s.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [b.input for b in uses]
    follow = client.messages.create(model=MODEL, max_tokens=5, tools=TOOLS, messages=ASK + [
        {"role": "assistant", "content": out.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                                     {"type": "text", "text": "Thanks."}]}])  # fmt: skip
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert follow.usage.cache_read_input_tokens > 0  # the conversation so far came from the prefix cache
    again = dict(model=MODEL, max_tokens=5, tools=TOOLS, messages=ASK + [{"role": "user", "content": "Once more."}],
                 extra_body=GREEDY)  # fmt: skip
    client.messages.create(**again)
    with client.messages.stream(**again) as s:  # the streamed message's usage says the same
        streamed = s.get_final_message().usage
    whole = client.messages.create(**again).usage
    assert streamed.cache_read_input_tokens > 0 and streamed.output_tokens == whole.output_tokens
    assert (
        streamed.input_tokens + streamed.cache_read_input_tokens == whole.input_tokens + whole.cache_read_input_tokens
    )


def test_stop_sequences_output_config_and_count_tokens(client) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    text = client.messages.create(model=MODEL, max_tokens=30, messages=hi, extra_body=GREEDY).content[0]
    stop = text.text[2:4]
    out = client.messages.create(model=MODEL, max_tokens=30, messages=hi, stop_sequences=[stop], extra_body=GREEDY)
    if stop.strip():
        assert out.stop_reason == "stop_sequence" and out.stop_sequence == stop
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    js = client.messages.create(model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "ok?"}],
                                output_config={"format": {"type": "json_schema", "schema": schema}})  # fmt: skip
    import json

    assert set(json.loads(js.content[0].text)) == {"ok"}
    count = client.messages.count_tokens(model=MODEL, messages=ASK, tools=TOOLS)
    assert count.input_tokens > client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens


@pytest.mark.parametrize("body,status,kind,fragment", [
    ({"model": MODEL, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image",
      "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]}]}, 400, "invalid_request_error", "image"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "x"}]}]}, 400, "invalid_request_error",
     "answers no tool_use"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}},
     400, "invalid_request_error", "thinking"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305",
      "name": "web_search"}]}, 400, "invalid_request_error", "server tool"),
    ({"model": "gpt-4", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "does not exist"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "mcp_servers": [{"type": "url", "url": "https://x",
      "name": "x"}]}, 400, "invalid_request_error", "mcp_servers is not supported"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 100_000}]}, 400,
     "invalid_request_error", "context length"),
])  # fmt: skip
def test_errors_in_anthropic_shape(server, body, status, kind, fragment) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": "k1"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind and fragment in err["error"]["message"], err
    assert server.metric("vllm:num_requests_running") == 0


def test_an_empty_mcp_servers_list_is_no_mcp_server(server) -> None:
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": "k1"}, timeout=60,
                   json={"model": MODEL, "max_tokens": 2, "messages": ASK, "mcp_servers": []})  # fmt: skip
    assert r.status_code == 200, r.text


def test_the_key_comes_first(server) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=1, messages=ASK)  # fmt: skip
    big = httpx.post(f"{server.url}/v1/messages", content=b"x" * (2 << 20), headers={"x-api-key": "k1",
                     "content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)  # Qwen3's switch: with thinking off, an empty <think> block is written into the prompt


def test_thinking_where_the_template_has_a_thinking_mode(tiny_long_model_dir, tmp_path) -> None:
    import shutil

    model = tmp_path / "thinking-model"
    shutil.copytree(tiny_long_model_dir, model)
    (model / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    r = start_server(model)
    try:
        c = anthropic.Anthropic(base_url=r.url, api_key="unused", max_retries=0)
        on = c.messages.count_tokens(model=MODEL, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024})
        off = c.messages.count_tokens(model=MODEL, messages=ASK, thinking={"type": "disabled"})
        assert off.input_tokens > on.input_tokens  # the switch reached the template
        out = c.messages.create(model=MODEL, max_tokens=8, messages=ASK, thinking={"type": "adaptive"})
        assert out.stop_reason in ("max_tokens", "end_turn") and out.content
    finally:
        stop_server(r)
