"""Tool calling through the API, checked with the official openai client on a tiny random model:
forced and named calls always parse (a grammar writes them), streamed exactly as OpenAI streams
them; auto, strict tools, parallel calls, tool-result round trips, tools with response_format."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
           "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}  # fmt: skip
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "web_search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "web_search": SEARCH}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir)
    yield r
    stop_server(r)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def streamed(stream) -> tuple[str, list[dict], str | None, list]:
    """Content, calls and finish_reason of a stream, folded as a client does; checks OpenAI's delta shape."""
    content, calls, finish, chunks = "", {}, None, list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:  # a call's first delta: id, type and name
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, chunks


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in names
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_required_and_named_calls_always_parse(client) -> None:
    for choice, names in [("required", {"get_weather", "web_search"}),
                          ({"type": "function", "function": {"name": "web_search"}}, {"web_search"})]:  # fmt: skip
        for seed in range(3):
            kw = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=400, temperature=1.0,
                      seed=seed)  # fmt: skip
            whole = client.chat.completions.create(**kw).choices[0]
            assert whole.finish_reason == "tool_calls" and whole.message.content is None
            calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                     for t in whole.message.tool_calls]  # fmt: skip
            check_calls(calls, names)
            assert all(c["id"].startswith("call_") for c in calls)
            content, s_calls, finish, _ = streamed(client.chat.completions.create(**kw, stream=True))
            assert content == "" and finish == "tool_calls"
            assert [(c["name"], c["arguments"]) for c in s_calls] == [(c["name"], c["arguments"]) for c in calls]


def test_parallel_tool_calls_false_gives_one_call(client) -> None:
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=seed)  # fmt: skip
        assert len(out.choices[0].message.tool_calls) == 1


def test_a_short_budget_still_closes_the_call(client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string"}}, "required": ["x"]}}}]  # fmt: skip
    for max_tokens in (60, 90, 140):
        out = client.chat.completions.create(model=MODEL, messages=MSG, tools=tools, tool_choice="required",
                                             max_tokens=max_tokens, temperature=1.0, seed=1)  # fmt: skip
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", (max_tokens, choice)
        assert set(json.loads(choice.message.tool_calls[0].function.arguments)) == {"x"}


def test_auto_none_and_strict(client) -> None:
    auto = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=30, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert "<tool_call>" not in (auto.choices[0].message.content or "")
    none = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=10,
                                          temperature=0)  # fmt: skip
    assert none.choices[0].message.tool_calls is None
    strict = [dict(t, function=dict(t["function"], strict=True)) for t in TOOLS]
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=strict, max_tokens=300, temperature=1.0,
                                         seed=4)  # fmt: skip
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in out.choices[0].message.tool_calls or []:  # once a call starts, its arguments follow the schema
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_result_round_trip_and_history_rendering(client, server) -> None:
    first = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=0)  # fmt: skip
    message = first.choices[0].message
    history = MSG + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True, "n": i})}
        for i, call in enumerate(message.tool_calls)
    ]  # fmt: skip
    again = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": history}).json()["count"]
    assert prompt > len(MSG[0]["content"]) // 4


def test_tools_with_response_format_answer_either_way(client) -> None:
    answer = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"]}}}  # fmt: skip
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, response_format=answer,
                                             max_tokens=300, temperature=1.0, seed=seed).choices[0]  # fmt: skip
        if out.message.tool_calls:
            check_calls([{"name": t.function.name, "arguments": t.function.arguments} for t in out.message.tool_calls],
                        set(SCHEMAS))  # fmt: skip
        else:
            assert set(json.loads(out.message.content)) == {"text"}


@pytest.mark.parametrize("body,fragment,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools",
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
    ({"tools": TOOLS * 2}, "unique", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function name", "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "drop response_format",
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
      "tool_choice": "required"}, "not a valid JSON Schema", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}]},
     "not a valid JSON Schema", "tools"),  # checked even where nothing is compiled (tool_choice auto)
    ({"functions": [{"name": "f"}]}, "use tools", "functions"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id", "messages"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "nope"}}]}}}, "not among the tools", "tool_choice"),
])  # fmt: skip
def test_bad_tool_requests(server, body, fragment, param) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 5, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == param, err


def test_allowed_tools_choice(client) -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "web_search"}}]}}  # fmt: skip
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=300,
                                         temperature=1.0, seed=2)  # fmt: skip
    assert [t.function.name for t in out.choices[0].message.tool_calls] == ["web_search"] * len(
        out.choices[0].message.tool_calls)  # fmt: skip


def test_a_parser_named_at_start(tiny_long_model_dir) -> None:
    """--tool-call-parser picks the format: llama3's JSON calls, taught by its own prompt."""
    from agora.config import ServerConfig  # noqa: F401  (the server config carries the name)

    r = start_server(tiny_long_model_dir, tool_call_parser="llama3_json")
    try:
        c = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
        out = c.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=300,
                                        temperature=1.0, seed=1)  # fmt: skip
        call = out.choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    finally:
        stop_server(r)


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)  # a Qwen-style template: it renders tools and calls itself


def _request(**body):
    from agora.openai.chat import ChatCompletionRequest

    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "web_search", "arguments": '{"query": "rain"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "no rain"},
    ]  # fmt: skip
    return ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS, **body})


def test_a_template_that_knows_tools_renders_them_itself() -> None:
    from agora.server.tools import chat_tools

    tools = chat_tools(_request(), HERMES_TEMPLATE, None)
    assert tools.parser.name == "hermes" and [t["function"]["name"] for t in tools.template_tools] == [
        "get_weather", "web_search"]  # fmt: skip
    call = tools.messages[1]["tool_calls"][0]["function"]
    assert call["arguments"] == {"city": "Paris"}  # an object: the template writes it with tojson
    assert [m["role"] for m in tools.messages] == ["user", "assistant", "tool", "tool"]


def test_a_template_that_knows_no_tools_gets_them_written_in() -> None:
    from agora.server.tools import chat_tools

    tools = chat_tools(_request(), "{% for m in messages %}{{ m.content }}{% endfor %}", None)
    roles = [m["role"] for m in tools.messages]
    assert roles == ["system", "user", "assistant", "user"]  # both results in one user turn: roles alternate
    assert "<tools>" in tools.messages[0]["content"] and "get_weather" in tools.messages[0]["content"]
    assert tools.messages[2]["content"].count("<tool_call>") == 2
    assert (
        tools.messages[3]["content"]
        == "<tool_response>\n18C\n</tool_response>\n<tool_response>\nno rain\n</tool_response>"
    )
    none = chat_tools(_request(tool_choice="none"), "{{ messages }}", None)
    assert none.parser is None and none.messages[0]["role"] == "user"  # history still written, no tool prompt
