"""The Responses and Messages encodings without a server: chat chunks in, each API's events out,
and the gateway cache's read-and-replay of Anthropic replies."""

from __future__ import annotations

from agora.openai.chat import ChatChunkChoice, ChatCompletionChunk, ChatDelta, FunctionCallDelta, ToolCallDelta
from agora.openai.common import Usage
from agora.openai.messages import MessageEvents, Reply, reply_events, reply_from_sse
from agora.openai.responses import ResponseEvents, ResponsesRequest, new_response
from agora.openai.stream import sse_named


def chunk(content: str | None = None, call: tuple | None = None, finish: str | None = None) -> ChatCompletionChunk:
    calls = None
    if call is not None:
        index, cid, name, args = call
        calls = [ToolCallDelta(index=index, id=cid, type="function" if cid else None,
                               function=FunctionCallDelta(name=name, arguments=args))]  # fmt: skip
    delta = ChatDelta(content=content, tool_calls=calls)
    return ChatCompletionChunk(choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)])


CHUNKS = [chunk("Let me "), chunk("check."), chunk(call=(0, "call_1", "get_weather", '{"city": ')),
          chunk(call=(0, None, None, '"Oslo"}')), chunk(finish="tool_calls")]  # fmt: skip


def test_response_events_in_order_with_one_item_per_run() -> None:
    events = ResponseEvents(new_response(ResponsesRequest(input="x"), "m"))
    out = events.start() + [e for c in CHUNKS for e in events.feed(c)] + events.finish(Usage.of(10, 5, 4))
    kinds = [e["type"] for e in out]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]  # fmt: skip
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check."
    assert final["output"][1]["arguments"] == '{"city": "Oslo"}' and final["output"][1]["call_id"] == "call_1"
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4


def test_message_events_and_the_cache_round_trip() -> None:
    events = MessageEvents(Reply(id="msg_1", model="m"), prompt_tokens=10)
    out = events.start() + [e for c in CHUNKS for e in events.feed(c)] + events.finish(Usage.of(10, 5, 4))
    names = [e["type"] for e in out]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    reply = events.reply
    assert reply.stop_reason == "tool_use" and reply.content[1]["input"] == {"city": "Oslo"}
    assert reply.usage.cache_read_input_tokens == 4 and reply.usage.input_tokens == 6
    # message_start counted the whole prompt as input; the cached part is known at the end, and said there
    assert out[0]["message"]["usage"]["input_tokens"] == 10
    assert out[-2]["usage"] == {"input_tokens": 6, "output_tokens": 5, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 4}  # fmt: skip
    replayed = reply_from_sse("".join(sse_named(e) for e in reply_events(reply)))
    assert replayed is not None and replayed.model_dump() == reply.model_dump()
