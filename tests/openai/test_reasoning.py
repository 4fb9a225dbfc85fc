"""A reasoning model's thinking told from its answer, without a server: the splitter wherever the tags
fall, the chat accumulator (calls parsed from the answer only, thinking tokens counted, whole == streamed),
each API's encoding of it, reasoning sent back in a conversation, and the grammar that lets the model think."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from agora.openai.accumulate import ChatStream
from agora.openai.chat import ChatCompletionRequest, ChatMessage
from agora.openai.common import StructuredOutputs
from agora.openai.errors import APIError
from agora.openai.messages import MessageEvents, MessagesRequest, Reply
from agora.openai.reasoning import MAY_OPEN, NOT_THINKING, OPENED, Reasoning, ThinkSplitter, think_format
from agora.openai.responses import ResponseEvents, ResponsesRequest, new_response, reasoning_from_blob
from agora.openai.stream import chat_chunks, merge_chat_chunks
from agora.openai.tool_parsers import PARSERS
from agora.server.tools import template_message, with_thinking

QWEN3 = "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
R1 = "{{ '<|Assistant|><think>\\n' }}{% if '</think>' in content %}{% endif %}"


def split(text: str, starts: str, cuts: list[int]) -> dict[str, str]:
    splitter, pieces, prev = ThinkSplitter(starts), [], 0
    for cut in [*cuts, len(text)]:
        pieces += splitter.feed(text[prev:cut])
        prev = cut
    pieces += splitter.feed("", final=True)
    joined = {"thinking": "", "text": ""}
    for kind, piece in pieces:
        joined[kind] += piece
    return joined


def test_the_split_is_the_same_wherever_the_text_is_cut() -> None:
    text = "<think>\nweigh it\n\nand again\n</think>\n\nThe answer.\n\nDone."
    want = {"thinking": "weigh it\n\nand again", "text": "The answer.\n\nDone."}
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
        assert split(text, MAY_OPEN, cuts) == want, cuts
    for k in range(1, len(text)):  # every single cut, the tags' insides included
        assert split(text, MAY_OPEN, [k]) == want, k


def test_where_the_output_starts() -> None:
    assert Reasoning.starts("<|im_start|>assistant\n<think>\n\n</think>\n\n") == NOT_THINKING  # Qwen3, off
    assert Reasoning.starts("<｜Assistant｜><think>\n") == OPENED  # DeepSeek-R1's template opens it
    assert Reasoning.starts("<|im_start|>assistant\n") == MAY_OPEN
    # the prompt opened the tag: everything up to </think> is thinking
    assert split("hmm</think>ok", OPENED, []) == {"thinking": "hmm", "text": "ok"}
    assert split("cut off mid thought\n", OPENED, [4]) == {"thinking": "cut off mid thought", "text": ""}
    # a model that may open the tag and does not: all answer, and a later <think> is the answer's text
    assert split("  Sure. <think>x</think>", MAY_OPEN, [3]) == {"thinking": "", "text": "  Sure. <think>x</think>"}
    assert split("<thin", MAY_OPEN, []) == {"thinking": "", "text": "<thin"}  # it ended before the tag was whole
    assert split("\n\nAnswer", NOT_THINKING, [1]) == {"thinking": "", "text": "Answer"}


def test_the_model_reasons_by_its_template_or_the_flag() -> None:
    assert Reasoning.of(None) is None and Reasoning.of("{{ messages }}") is None
    assert Reasoning.of(QWEN3, generation_prompt="<|im_start|>assistant\n") == Reasoning(switch=True)
    assert Reasoning.of(R1, generation_prompt="<|Assistant|><think>\n") == Reasoning(always=True)
    assert Reasoning.of(R1, generation_prompt="<|Assistant|>") == Reasoning()  # strips past thinking, may think
    assert Reasoning.of(QWEN3, "none") is None
    assert Reasoning.of("{{ messages }}", "deepseek_r1") == Reasoning()
    with pytest.raises(ValueError, match="reasoning parser 'granite'"):
        Reasoning.of(QWEN3, "granite")


def test_an_effort_turns_a_switchable_model_on_or_off() -> None:
    switch, always, may = Reasoning(switch=True), Reasoning(always=True), Reasoning()
    assert switch.template_kwargs(None, {"x": 1}, "reasoning_effort") == {"x": 1}
    assert switch.template_kwargs("none", None, "reasoning_effort") == {"enable_thinking": False}
    assert switch.template_kwargs("minimal", None, "reasoning_effort") == {"enable_thinking": False}
    assert switch.template_kwargs("high", {"x": 1}, "reasoning_effort") == {"x": 1, "enable_thinking": True}
    assert switch.template_kwargs("low", {"enable_thinking": True}, "e") == {"enable_thinking": True}
    with pytest.raises(APIError, match="contradicts") as err:
        switch.template_kwargs("none", {"enable_thinking": True}, "reasoning")
    assert err.value.param == "reasoning"
    assert always.template_kwargs("medium", None, "reasoning_effort") is None
    with pytest.raises(APIError, match="always reasons"):
        always.template_kwargs("none", None, "reasoning_effort")
    assert may.template_kwargs("none", None, "reasoning_effort") is None  # it thinks of its own accord, if at all
    with pytest.raises(APIError, match="no switch to turn thinking on"):
        may.template_kwargs("high", None, "reasoning_effort")
    with pytest.raises(APIError, match="'extreme' is not one of"):
        switch.template_kwargs("extreme", None, "reasoning_effort")


def _out(text: str, tokens: int = 1, finished: bool = False, offsets: list[int] | None = None, index: int = 0):  # noqa: ANN202
    return SimpleNamespace(index=index, text=text, token_ids=list(range(tokens)), logprobs=[], finished=finished,
                           finish_reason="stop" if finished else None, stop_reason=None, num_cached_tokens=0,
                           text_offsets=offsets or [], prompt_logprobs=None)  # fmt: skip


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
# a thinking that writes a call's markup (it is only considering it), then the call itself
STEPS = ["<think>", "\nI could write ", '<tool_call>{"name": "x"}</tool_call>', " here.\n", "</think>", "\n\n",
         CALL[:20], CALL[20:]]  # fmt: skip


def _chat(include: bool = True, starts: str = MAY_OPEN, tools: bool = True) -> ChatStream:
    return ChatStream("chatcmpl-1", "m", 1, 7, logprobs=False, token_text=str, think=starts,
                      tool_parser=PARSERS["hermes"] if tools else None, include_reasoning=include)  # fmt: skip


def test_calls_are_parsed_from_the_answer_only_and_thinking_tokens_counted() -> None:
    acc = _chat()
    chunks = acc.start()
    for i, step in enumerate(STEPS):
        chunks += acc.feed(0, _out(step, finished=i == len(STEPS) - 1))
    whole = merge_chat_chunks(chunks, acc.usage())
    msg = whole.choices[0].message
    assert msg.reasoning == 'I could write <tool_call>{"name": "x"}</tool_call> here.'
    assert msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]  # fmt: skip
    assert whole.choices[0].finish_reason == "tool_calls"
    usage = whole.usage.model_dump()
    assert usage["completion_tokens"] == 8 and usage["completion_tokens_details"] == {"reasoning_tokens": 5}
    streamed = [c.model_dump(exclude_none=True) for c in chunks]
    assert {"reasoning"} == set(streamed[2]["choices"][0]["delta"])  # a thinking delta has no content
    # the gateway cache's replay of the whole answer adds up to it again
    assert merge_chat_chunks(chat_chunks(whole), whole.usage).model_dump() == whole.model_dump()


def test_a_step_of_several_tokens_counts_each_on_its_side() -> None:
    acc = _chat()
    text = "<think>ab</think>cd"  # five tokens in one step (speculation): "<think>" "ab" "</think>" "c" "d"
    acc.feed(0, _out(text, tokens=5, finished=True, offsets=[0, 7, 9, 17, 18]))
    assert acc.usage().completion_tokens_details.reasoning_tokens == 3


def test_include_reasoning_false_drops_the_thinking_but_counts_it() -> None:
    acc = _chat(include=False)
    chunks = acc.start() + acc.feed(0, _out("<think>x</think>")) + acc.feed(0, _out("Paris", finished=True))
    whole = merge_chat_chunks(chunks, acc.usage())
    assert whole.choices[0].message.reasoning is None and whole.choices[0].message.content == "Paris"
    assert whole.usage.completion_tokens_details.reasoning_tokens == 1


def test_a_model_that_does_not_reason_is_unchanged() -> None:
    acc = ChatStream("chatcmpl-1", "m", 1, 7, logprobs=False, token_text=str)
    whole = merge_chat_chunks(acc.start() + acc.feed(0, _out("<think>x</think>", finished=True)), acc.usage())
    assert whole.choices[0].message.content == "<think>x</think>"
    dumped = whole.model_dump(mode="json", exclude_unset=True)
    assert "reasoning" not in json.dumps(dumped) and "completion_tokens_details" not in dumped["usage"]


def _thinking_chunks() -> tuple[list, object]:
    acc = _chat(starts=OPENED, tools=False)
    chunks = []
    for i, step in enumerate(["weigh", " it</think>", "\n\nThe ", "answer."]):
        chunks += acc.feed(0, _out(step, finished=i == 3))
    return chunks, acc.usage()


def test_responses_gives_a_reasoning_item_before_the_message() -> None:
    events = ResponseEvents(new_response(ResponsesRequest(input="x"), "m"), encrypted=True)
    chunks, usage = _thinking_chunks()
    out = events.start() + [e for c in chunks for e in events.feed(c)] + events.finish(usage)
    kinds = [e["type"] for e in out]
    assert kinds[2:9] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta", "response.reasoning_text.delta",
                          "response.reasoning_text.done", "response.content_part.done",
                          "response.output_item.done"]  # fmt: skip
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    thought = final["output"][0]
    assert thought["content"] == [{"type": "reasoning_text", "text": "weigh it"}] and thought["summary"] == []
    assert reasoning_from_blob(thought["encrypted_content"]) == "weigh it"
    assert final["output"][1]["content"][0]["text"] == "The answer."
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    import openai.types.responses as types  # the SDK's own models read it

    assert types.Response.model_validate(final).output[0].content[0].text == "weigh it"


def test_messages_gives_thinking_blocks() -> None:
    events = MessageEvents(Reply(id="msg_1", model="m"), prompt_tokens=3)
    chunks, usage = _thinking_chunks()
    [e for c in chunks for e in events.feed(c)]
    events.finish(usage)
    assert events.reply.content == [{"type": "thinking", "thinking": "weigh it", "signature": ""},
                                    {"type": "text", "text": "The answer."}]  # fmt: skip


def test_reasoning_sent_back_reaches_the_template() -> None:
    for field in ("reasoning", "reasoning_content"):
        m = ChatMessage.model_validate({"role": "assistant", "content": "4", field: "2 + 2"})
        assert template_message(m, knows_tools=True)["reasoning_content"] == "2 + 2"
    with pytest.raises(ValueError, match="only assistant messages carry reasoning"):
        ChatMessage.model_validate({"role": "user", "content": "hi", "reasoning": "no"})
    # Responses: a reasoning item goes to the assistant turn after it (here a call), a user turn drops it
    req = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "ask"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "dropped"}]},
        {"role": "user", "content": "thanks"},
    ]})  # fmt: skip
    messages = req.to_chat([]).messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "user"]
    assert messages[1].thinking() == "ask" and messages[1].tool_calls[0].id == "c1"
    # Messages: thinking blocks of an assistant turn
    chat = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "greet", "signature": ""},
                                          {"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "again"}]}).to_chat(Reasoning(switch=True))  # fmt: skip
    assert chat.messages[1].thinking() == "greet" and chat.include_reasoning is False
    budgeted = MessagesRequest.model_validate({"model": "m", "max_tokens": 4096, "messages": [{"role": "user",
        "content": "hi"}], "thinking": {"type": "enabled", "budget_tokens": 2048}}).to_chat(Reasoning(switch=True))  # fmt: skip
    assert budgeted.thinking_token_budget == 2048 and budgeted.include_reasoning is True


def test_the_constraint_comes_after_the_thinking() -> None:
    spec = StructuredOutputs.model_validate({"json": {"type": "object"}})
    opened = with_thinking(spec, OPENED).structural_tag
    assert opened["format"]["elements"][0] == {"type": "tag", "begin": "", "content": {"type": "any_text"},
                                               "end": "</think>"}  # fmt: skip
    assert opened["format"]["elements"][2] == {"type": "json_schema", "json_schema": {"type": "object"}}
    may = with_thinking(spec, MAY_OPEN).structural_tag["format"]["elements"][0]
    assert may["type"] == "optional" and may["content"]["elements"][0]["begin"] == "<think>"
    assert think_format({"type": "const_string", "value": "x"}, NOT_THINKING) == {"type": "const_string",
                                                                                     "value": "x"}  # fmt: skip
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    wrapped = with_thinking(StructuredOutputs.model_validate({"structural_tag": tag}), OPENED).structural_tag
    assert wrapped["format"]["elements"][2] == tag["format"]


def test_chat_requests_take_reasoning_effort_and_include_reasoning() -> None:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                "reasoning_effort": "high", "include_reasoning": False})  # fmt: skip
    req.check()  # the effort is the served model's to honour or refuse
    assert req.reasoning_effort == "high" and req.include_reasoning is False
