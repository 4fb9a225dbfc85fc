"""The usage meter counts a prompt whole in every API: Anthropic's usage leaves the cached part out of
``input_tokens``, and a tenant's budget must not shrink by what the prefix cache served."""

from __future__ import annotations

import json

from agora.router.governance.meter import UsageMeter


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}".encode()


def test_messages_count_the_cached_prompt_too() -> None:
    whole = UsageMeter("messages")
    whole.body(json.dumps({"type": "message", "content": [], "usage": {
        "input_tokens": 6, "cache_read_input_tokens": 816, "cache_creation_input_tokens": 0, "output_tokens": 5}}).encode())  # fmt: skip
    assert whole.result(None, 0) == (822, 5)
    streamed = UsageMeter("messages")
    streamed.event(_event("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 822}}}))
    assert streamed.result(None, 0) == (822, 0)  # a client gone now is charged the whole prompt
    streamed.event(_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "input_tokens": 6, "cache_read_input_tokens": 816, "output_tokens": 5}}))  # fmt: skip
    assert streamed.result(None, 0) == (822, 5)
    older = UsageMeter("messages")  # a server that sends only output_tokens on message_delta (Anthropic's older)
    older.event(_event("message_start", {"type": "message_start", "message": {"usage": {
        "input_tokens": 6, "cache_read_input_tokens": 816}}}))  # fmt: skip
    older.event(_event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 5}}))
    assert older.result(None, 0) == (822, 5)


def test_openai_apis_count_prompt_tokens_as_given() -> None:
    chat = UsageMeter("chat")
    chat.body(json.dumps({"usage": {"prompt_tokens": 822, "completion_tokens": 5,
                                    "prompt_tokens_details": {"cached_tokens": 816}}}).encode())  # fmt: skip
    assert chat.result(None, 0) == (822, 5)
    responses = UsageMeter("responses")
    responses.body(json.dumps({"usage": {"input_tokens": 822, "output_tokens": 5,
                                         "input_tokens_details": {"cached_tokens": 816}}}).encode())  # fmt: skip
    assert responses.result(None, 0) == (822, 5)
