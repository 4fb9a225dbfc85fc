"""The OpenAI Responses API, checked with the official openai client (create, stream, function tools,
previous_response_id, stored responses) and the OpenAI Agents SDK's default Responses model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_long_model_dir, tmp_path_factory):
    r = start_server(tiny_long_model_dir, api_key="k1", responses_store=str(tmp_path_factory.mktemp("store") / "r.db"))
    yield r
    stop_server(r)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="k1", max_retries=0)


def test_output_text_logprobs(client) -> None:
    kw = dict(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"])  # fmt: skip
    whole = client.responses.create(**kw)
    part = whole.output[0].content[0]
    assert len(part.logprobs) == whole.usage.output_tokens > 0
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= lp.top_logprobs[0].logprob + 1e-6 for lp in part.logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert [lp.token for lp in part.logprobs] == [lp.token for lp in chat.choices[0].logprobs.content]
    events = list(client.responses.create(stream=True, **kw))
    deltas = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    final = events[-1].response.output[0].content[0]  # response.incomplete (max_output_tokens) or completed
    assert [lp.token for lp in final.logprobs] == [lp.token for lp in part.logprobs]
    assert deltas == [lp.token for lp in part.logprobs][: len(deltas)] and deltas  # a token with no text: at the end
    assert client.responses.retrieve(whole.id).output[0].content[0].logprobs == part.logprobs  # stored with them
    plain = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=3)
    assert plain.output[0].content[0].logprobs == []


def test_create_and_stream_agree(client) -> None:
    kw = dict(model=MODEL, input="Hello there", max_output_tokens=4, temperature=0)
    whole = client.responses.create(**kw)
    assert whole.object == "response" and whole.status == "incomplete"
    assert whole.incomplete_details.reason == "max_output_tokens" and whole.usage.output_tokens == 4
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    final = events[-1].response  # an incomplete response ends with response.incomplete (as OpenAI's do)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == whole.output_text and final.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text


def test_function_calls_round_trip_through_previous_response_id(client) -> None:
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                    max_output_tokens=300, temperature=0)  # fmt: skip
    calls = [o for o in first.output if o.type == "function_call"]
    assert first.status == "completed" and calls and calls[0].name == "get_weather"
    assert "city" in json.loads(calls[0].arguments) and calls[0].call_id
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                 max_output_tokens=300, temperature=0) as stream:  # fmt: skip
        events = list(stream)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == calls[0].arguments  # streamed and whole: the same call
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, max_output_tokens=8,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "sunny"}], temperature=0)  # fmt: skip
    assert second.previous_response_id == first.id
    # the whole chain is the prompt, and its start comes from the prefix cache
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(first.id).output[0].call_id == calls[0].call_id
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    # only background responses can be cancelled or streamed again, and none runs here: said, not a bare 404
    with pytest.raises(openai.BadRequestError, match="not created with background: true"):
        client.responses.cancel(second.id)
    with pytest.raises(openai.BadRequestError, match="only a background response's events") as refused:
        client.responses.retrieve(second.id, stream=True)
    assert refused.value.param == "stream"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_structured_text_format(client) -> None:
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": {"type": "object", "properties": {
        "name": {"type": "string"}}, "required": ["name"]}}}  # fmt: skip
    out = client.responses.create(model=MODEL, input="A city?", text=fmt, max_output_tokens=60, temperature=0)
    assert out.status == "completed" and set(json.loads(out.output_text)) == {"name"}


def test_built_in_tool_cap_and_in_memory_cache_retention_hold_trivially(client) -> None:
    # max_tool_calls caps calls to OpenAI's built-in tools, of which agora has none; its prefix cache is in memory
    out = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, max_tool_calls=3,
                                  prompt_cache_retention="in_memory")  # fmt: skip
    assert out.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=2, prompt_cache_retention="24h")
    assert refused.value.param == "prompt_cache_retention"


def test_text_verbosity_medium_is_the_only_one(client) -> None:
    # OpenAI's answer for a model without the setting: its default is accepted (and echoed), others refused
    out = client.responses.create(model=MODEL, input="hi", text={"verbosity": "medium"}, max_output_tokens=2)
    assert out.text.verbosity == "medium" and out.text.format.type == "text"
    with pytest.raises(openai.BadRequestError, match="verbosity") as refused:
        client.responses.create(model=MODEL, input="hi", text={"verbosity": "low"}, max_output_tokens=2)
    assert refused.value.param == "text"


def test_another_key_cannot_see_a_stored_response(server, tiny_long_model_dir) -> None:
    # one server key, two tenants behind a gateway: the gateway names the tenant, the store keeps them apart
    headers = {"authorization": "Bearer k1", "x-agora-tenant": "alice"}
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2},
                   headers=headers, timeout=60)  # fmt: skip
    rid = r.json()["id"]
    assert httpx.get(f"{server.url}/v1/responses/{rid}", headers=headers).status_code == 200
    other = {"authorization": "Bearer k1", "x-agora-tenant": "bob"}
    assert httpx.get(f"{server.url}/v1/responses/{rid}", headers=other).status_code == 404
    follow = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "more",
                        "previous_response_id": rid}, headers=other, timeout=60)  # fmt: skip
    assert follow.status_code == 404 and follow.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(f"{server.url}/v1/responses/{rid}").status_code == 401


@pytest.mark.parametrize("body,status,param", [
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "x", "include": ["file_search_call.results"]}, 400, "include"),
    ({"input": "x", "top_logprobs": 21}, 400, "top_logprobs"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, 400, "reasoning"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "multi_agent_v1"}]}, 400, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, 400, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"input": "x" * 100_000}, 400, "input"),
])  # fmt: skip
def test_bad_requests(server, body, status, param) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body}, headers={"authorization": "Bearer k1"},
                   timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.metric("vllm:num_requests_running") == 0  # a refused request leaves nothing running


async def test_agents_sdk_default_responses_model(server) -> None:
    agents = pytest.importorskip("agents")

    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k1", max_retries=0)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agents.set_tracing_disabled(True)
    agent = agents.Agent(name="weather", instructions="Answer about the weather.", tools=[get_weather], model=MODEL,
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=200))  # fmt: skip
    result = await agents.Runner.run(agent, "Weather in Paris?", max_turns=4)
    assert seen and isinstance(result.final_output, str)
    await client.close()


def test_truncation_auto_drops_the_oldest_items_to_fit(tiny_model_dir, tmp_path) -> None:
    """A previous_response_id chain that outgrows the context (512 tokens here): with truncation "auto" each turn
    drops the fewest items from the beginning of the conversation to leave room for output; without it, a 400.
    What is left opens with a user message: the template here refuses any other start, as Gemma's does."""
    import shutil

    model = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception("
                                               "'Conversation roles must alternate user/assistant') }}{% endif %}"
                                               + template)  # fmt: skip
    r = start_server(model, responses_store=str(tmp_path / "r.db"))
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
        words = " ".join(["cat"] * 60)
        prev, sizes = None, []
        for turn in range(8):
            out = client.responses.create(model=MODEL, input=f"turn {turn}: {words}", previous_response_id=prev,
                                          max_output_tokens=4, temperature=0, truncation="auto")  # fmt: skip
            assert out.truncation == "auto" and out.status in ("completed", "incomplete")
            prev = out.id
            sizes.append(out.usage.input_tokens)
        assert sizes[1] > sizes[0] and max(sizes) < 512  # it grew, then items were dropped to fit (see the 400 below)
        with pytest.raises(openai.BadRequestError) as refused:  # the same chain, without truncation
            client.responses.create(model=MODEL, input="one more", previous_response_id=prev, max_output_tokens=4)
        assert refused.value.param == "input"
        with pytest.raises(openai.BadRequestError, match="context length") as alone:  # one item too long: no cure
            client.responses.create(model=MODEL, input=words * 12, max_output_tokens=4, truncation="auto")
        assert alone.value.param == "input"
    finally:
        stop_server(r)


def test_truncated_conversation_leaves_no_output_without_its_call() -> None:
    from agora.openai.responses import ResponsesRequest

    req = ResponsesRequest.model_validate({"input": [
        {"type": "message", "role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "user", "content": "and tomorrow?"},
    ]})  # fmt: skip
    assert [m.role for m in req.to_chat([], drop=1).messages] == ["assistant", "tool", "user"]
    assert [m.role for m in req.to_chat([], drop=2).messages] == ["user"]  # the output went with its call
