"""Reasoning models through every API, with the official clients, on the tiny random model given the chat
templates of the two kinds of reasoning model: one whose prompt opens ``<think>`` (DeepSeek-R1 and its
distills: everything before ``</think>`` is thinking) and one with Qwen3's switch (``enable_thinking``).
A response format or a required tool still holds after the thinking (its grammar lets the model think
first, then the ending plan closes the thinking in time)."""

from __future__ import annotations

import json
import shutil

import anthropic
import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, start_server, stop_server
from tests.server.test_agent_frameworks import Forecast, weather_tool

pytest.importorskip("xgrammar")

HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n"
    "</think>\n\n{% endif %}{{ (m['content'] or '').split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
)
R1_TEMPLATE = HISTORY + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
QWEN3_TEMPLATE = HISTORY + (
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}},
        "required": ["name", "population"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]  # fmt: skip


def _model(base, tmp_path, name: str, template: str):  # noqa: ANN001, ANN202
    model = tmp_path / name
    shutil.copytree(base, model)
    (model / "chat_template.jinja").write_text(template)
    return model


@pytest.fixture(scope="module")
def r1(tiny_long_model_dir, tmp_path_factory):
    r = start_server(_model(tiny_long_model_dir, tmp_path_factory.mktemp("r1"), "r1", R1_TEMPLATE))
    yield r
    stop_server(r)


@pytest.fixture(scope="module")
def qwen3(tiny_long_model_dir, tmp_path_factory):
    r = start_server(_model(tiny_long_model_dir, tmp_path_factory.mktemp("qwen3"), "qwen3", QWEN3_TEMPLATE))
    yield r
    stop_server(r)


@pytest.fixture(scope="module")
def server(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir)
    yield r
    stop_server(r)


def _tagged_model(out, special: bool):  # noqa: ANN001, ANN202
    """The tiny model with <think> and </think> as single tokens of its vocabulary, as Qwen3's are (``special``:
    marked special, as a tokenizer converted from a GGUF file may mark them), and DeepSeek-R1's template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_llama, build_tokenizer

    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in ("<think>", "</think>")])
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(R1_TEMPLATE)
    build_tiny_llama(out, vocab_size=len(tok), max_position_embeddings=4096)
    return out


@pytest.mark.parametrize("special", [False, True], ids=["plain-tags", "special-tags"])
def test_single_token_tags_split_and_budget(tmp_path, special) -> None:
    r = start_server(_tagged_model(tmp_path / "tagged", special))
    try:
        tok = r.engine.tokenizer
        assert len(tok.encode("</think>", False)) == 1
        c = _client(r)
        kw = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0, extra_body={"thinking_token_budget": 3})
        whole = c.chat.completions.create(**kw)
        msg = whole.choices[0].message
        # special tags are kept in the text for the split (decoding would drop them), never shown
        assert msg.reasoning and msg.content and "think>" not in msg.reasoning + msg.content
        assert whole.usage.completion_tokens_details.reasoning_tokens == 3 + 1
        assert _folded(c.chat.completions.create(**kw, stream=True))[:2] == (msg.reasoning, msg.content)
        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
        shaped = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=1.0, seed=0,
                                           response_format=fmt)  # fmt: skip
        jsonschema.validate(json.loads(shaped.choices[0].message.content), CITY)
    finally:
        stop_server(r)


def _client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _folded(stream) -> tuple[str, str, str | None]:  # noqa: ANN001
    """Reasoning, content and finish reason of a chat stream, folded as a client does."""
    reasoning, content, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    return reasoning, content, finish


def test_thinking_is_reasoning_not_content(r1) -> None:
    c = _client(r1)
    whole = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    msg = whole.choices[0].message
    assert msg.reasoning and not msg.content and "<think>" not in msg.reasoning  # never closed: all thinking
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens == 12
    streamed = _folded(c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                 stream=True))  # fmt: skip
    assert streamed == (msg.reasoning, "", "length")
    several = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, seed=3, n=2)
    assert all(ch.message.reasoning and not ch.message.content for ch in several.choices)  # each choice its own split
    assert several.usage.completion_tokens_details.reasoning_tokens == 24
    hidden = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                       extra_body={"include_reasoning": False})  # fmt: skip
    assert getattr(hidden.choices[0].message, "reasoning", None) is None
    assert hidden.usage.completion_tokens_details.reasoning_tokens == 12


def test_a_thinking_budget_ends_the_thinking_in_time(r1, server) -> None:
    c = _client(r1)
    end = len(r1.engine.tokenizer.encode("</think>", False))  # the tiny vocabulary spells it in several tokens
    kw = dict(model=MODEL, messages=ASK, max_tokens=30, temperature=0, extra_body={"thinking_token_budget": 4})
    whole = c.chat.completions.create(**kw)
    usage = whole.usage
    assert usage.completion_tokens_details.reasoning_tokens == 4 + end < usage.completion_tokens
    assert whole.choices[0].message.reasoning and whole.choices[0].message.content
    assert _folded(c.chat.completions.create(**kw, stream=True))[:2] == (whole.choices[0].message.reasoning,
                                                                         whole.choices[0].message.content)  # fmt: skip
    for budget, status, match in ((-1, 400, ">= 0"),):
        with pytest.raises(openai.BadRequestError, match=match) as err:
            c.chat.completions.create(**{**kw, "extra_body": {"thinking_token_budget": budget}})
        assert err.value.status_code == status and err.value.body["param"] == "thinking_token_budget"
    with pytest.raises(openai.BadRequestError, match="does not reason"):
        _client(server).chat.completions.create(**kw)
    anth = anthropic.Anthropic(base_url=r1.url, api_key="unused", max_retries=0)
    for budget, max_tokens in ((100, 2000), (2000, 2000)):
        with pytest.raises(anthropic.BadRequestError, match="budget_tokens must be at least 1024 and less than"):
            anth.messages.create(model=MODEL, max_tokens=max_tokens, messages=ASK,
                                 thinking={"type": "enabled", "budget_tokens": budget})  # fmt: skip


def test_a_response_format_holds_after_the_thinking(r1) -> None:
    c = _client(r1)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(3):
        kw = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        whole = c.chat.completions.create(**kw)
        msg = whole.choices[0].message
        assert msg.reasoning, seed  # the model thought first (the prompt opened the tag)
        jsonschema.validate(json.loads(msg.content), CITY)
        assert 0 < whole.usage.completion_tokens_details.reasoning_tokens < whole.usage.completion_tokens
        assert _folded(c.chat.completions.create(**kw, stream=True))[:2] == (msg.reasoning, msg.content)


def test_a_required_call_follows_the_thinking(r1) -> None:
    c = _client(r1)
    whole = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, temperature=1.0, seed=1,
                                      tools=TOOLS, tool_choice="required")  # fmt: skip
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning and "<tool_call>" not in choice.message.reasoning
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_reasoning_effort_by_the_model(r1, qwen3, server) -> None:
    def prompt_tokens(srv, **kw) -> int:  # noqa: ANN001, ANN003
        return _client(srv).chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, **kw).usage.prompt_tokens

    # Qwen3's switch: none turns thinking off (the empty block is in the prompt), high on
    off, on = prompt_tokens(qwen3, reasoning_effort="none"), prompt_tokens(qwen3, reasoning_effort="high")
    assert off > on == prompt_tokens(qwen3)
    with pytest.raises(openai.BadRequestError, match="contradicts") as err:
        prompt_tokens(qwen3, reasoning_effort="high", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert err.value.body["param"] == "reasoning_effort"
    # a model that always thinks cannot stop; one that does not reason cannot start
    prompt_tokens(r1, reasoning_effort="low")
    with pytest.raises(openai.BadRequestError, match="always reasons"):
        prompt_tokens(r1, reasoning_effort="none")
    prompt_tokens(server, reasoning_effort="none")
    with pytest.raises(openai.BadRequestError, match="does not reason") as err:
        prompt_tokens(server, reasoning_effort="high")
    assert err.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError, match="does not reason") as err:
        _client(server).responses.create(model=MODEL, input="hi", reasoning={"effort": "high"})
    assert err.value.body["param"] == "reasoning"


def test_reasoning_sent_back_reaches_the_template(qwen3) -> None:
    c = _client(qwen3)
    turn = [*ASK, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    plain = c.chat.completions.create(model=MODEL, messages=turn, max_tokens=1).usage.prompt_tokens
    turn[1] = {**turn[1], "reasoning": "The capital of France is Paris."}
    assert c.chat.completions.create(model=MODEL, messages=turn, max_tokens=1).usage.prompt_tokens > plain
    with pytest.raises(openai.BadRequestError, match="only assistant messages carry reasoning"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi", "reasoning": "x"}],
                                  max_tokens=1)  # fmt: skip


def test_responses_reasoning_items_whole_streamed_and_sent_back(r1) -> None:
    c = _client(r1)
    kw = dict(model=MODEL, input="What is the capital of France?", max_output_tokens=40, temperature=0,
              text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
              include=["reasoning.encrypted_content"])  # fmt: skip
    whole = c.responses.create(**kw)
    assert [i.type for i in whole.output] == ["reasoning", "message"]
    thought = whole.output[0]
    assert thought.content[0].type == "reasoning_text" and thought.content[0].text and thought.encrypted_content
    jsonschema.validate(json.loads(whole.output_text), CITY)
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens
    with c.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds and kinds.index("response.reasoning_text.done") < kinds.index(
        "response.output_text.delta")  # fmt: skip
    assert final.output[0].content[0].text == thought.content[0].text and final.output_text == whole.output_text
    # the chain (store) and the item sent back (store: false, as Codex runs) both carry the thinking
    follow = c.responses.create(model=MODEL, input="And Spain?", previous_response_id=whole.id, max_output_tokens=1)
    sent = [{"role": "user", "content": kw["input"]}, thought.model_dump(exclude_none=True),
            {"role": "assistant", "content": whole.output_text}, {"role": "user", "content": "And Spain?"}]  # fmt: skip
    again = c.responses.create(model=MODEL, input=sent, max_output_tokens=1, store=False)
    assert again.usage.input_tokens == follow.usage.input_tokens
    blob_only = {k: v for k, v in sent[1].items() if k != "content"}
    assert c.responses.create(model=MODEL, input=[sent[0], blob_only, *sent[2:]], max_output_tokens=1,
                              store=False).usage.input_tokens == follow.usage.input_tokens  # fmt: skip
    without = c.responses.create(model=MODEL, input=[sent[0], *sent[2:]], max_output_tokens=1, store=False)
    assert without.usage.input_tokens < follow.usage.input_tokens


def test_messages_thinking_blocks(r1) -> None:
    c = anthropic.Anthropic(base_url=r1.url, api_key="unused", max_retries=0)
    kw = dict(model=MODEL, max_tokens=12, messages=ASK, extra_body={"temperature": 0})
    on = c.messages.create(**kw, thinking={"type": "adaptive"})
    assert [b.type for b in on.content] == ["thinking"] and on.content[0].thinking
    with c.messages.stream(**kw, thinking={"type": "enabled"}) as stream:
        assert stream.get_final_message().content[0].thinking == on.content[0].thinking
    off = c.messages.create(**kw)  # not asked for: no thinking blocks (the model still thinks)
    assert off.content == [] and off.usage.output_tokens == 12


def test_the_flag_turns_splitting_off(tiny_long_model_dir, tmp_path) -> None:
    from agora.config import ServerConfig

    r = start_server(_model(tiny_long_model_dir, tmp_path, "r1", R1_TEMPLATE), reasoning_parser="none")
    try:
        whole = _client(r).chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0)
        assert whole.choices[0].message.content and whole.usage.completion_tokens_details is None
    finally:
        stop_server(r)
    with pytest.raises(ValueError, match="reasoning parser 'granite'"):
        ServerConfig(reasoning_parser="granite")


async def test_openai_agents_sdk_with_a_reasoning_model(r1) -> None:
    """The Agents SDK on both its models: reasoning items come back as items, the Responses model sends them
    back with the tool's result (so the thinking reaches the template mid tool loop), and a typed answer
    parses after the thinking."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    calls: list[str] = []
    get_weather = weather_tool(agents, calls)
    client = AsyncOpenAI(base_url=f"{r1.url}/v1", api_key="unused", max_retries=0)
    agents.set_tracing_disabled(True)
    settings = agents.ModelSettings(tool_choice="required", max_tokens=120, temperature=0.7)
    for model in (agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                  agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)):  # fmt: skip
        calls.clear()
        agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                             model=model, model_settings=settings)  # fmt: skip
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        kinds = [item.type for item in result.new_items]
        assert calls and "reasoning_item" in kinds and "tool_call_item" in kinds, (type(model).__name__, kinds)
        streamed = agents.Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=4)
        async for _ in streamed.stream_events():
            pass
        assert "reasoning_item" in [item.type for item in streamed.new_items]
        typed = agents.Agent(name="typed", instructions="Answer as JSON.", output_type=Forecast, model=model,
                             model_settings=agents.ModelSettings(max_tokens=120, temperature=0.7))  # fmt: skip
        out = await agents.Runner.run(typed, "Forecast for Oslo?", max_turns=2)
        assert isinstance(out.final_output, Forecast)
    await client.close()
