"""Server-sent events, and the two directions between a stream and a whole answer.

``merge_*_chunks`` folds a stream's chunks into the non-streamed answer: the server
builds every non-streamed answer this way (so the two cannot drift apart) and the
gateway's cache reads a relayed stream with it. ``*_chunks`` replays a whole answer as
the chunks a streaming server would send.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel

from agora.openai.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
)
from agora.openai.common import ChoiceLogprobs, CompletionLogprobs, Usage
from agora.openai.completions import Completion, CompletionChoice

SSE_DONE = "data: [DONE]\n\n"


def sse(event: BaseModel | dict[str, Any]) -> str:
    """One ``data:`` event."""
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_named(event: dict[str, Any]) -> str:
    """One event named by its ``type`` (``event:`` line, then the JSON): the Responses and Messages APIs' framing."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def stream_error(api: str, message: str, code: str = "upstream_error", sequence_number: int = 0) -> str:
    """The event that ends a stream which cannot go on, in each API's own shape: chat and completions
    (an ``error`` object, which the openai SDK raises), Responses (an ``error`` event), Messages (Anthropic's
    ``error`` event, which the anthropic SDK raises). ``sequence_number``: a Responses stream's next."""
    if api == "messages":
        return sse_named({"type": "error", "error": {"type": "api_error", "message": message}})
    if api == "responses":
        return sse_named({"type": "error", "code": "server_error", "message": message, "param": None,
                          "sequence_number": sequence_number})  # fmt: skip
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def sse_data(payload: str) -> Iterator[str]:
    """The data of each event in an SSE body (``[DONE]`` included), multi-line data joined."""
    lines: list[str] = []
    for line in payload.splitlines():
        if line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line and lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


# -- chat ---------------------------------------------------------------------------------------


def merge_chat_chunks(chunks: Iterable[ChatCompletionChunk], usage: Usage | None = None) -> ChatCompletion:
    """The chat.completion that a stream of chat.completion.chunk objects adds up to."""
    first: ChatCompletionChunk | None = None
    texts: dict[int, list[str]] = {}
    thinking: dict[int, list[str]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    lps: dict[int, list] = {}
    finish: dict[int, ChatChunkChoice] = {}
    token_ids: dict[int, list[int]] = {}
    prompt_lps = prompt_ids = None
    for chunk in chunks:
        first = first or chunk
        usage = chunk.usage or usage
        prompt_lps = chunk.prompt_logprobs or prompt_lps
        prompt_ids = chunk.prompt_token_ids if chunk.prompt_token_ids is not None else prompt_ids
        for c in chunk.choices:
            texts.setdefault(c.index, [])
            if c.token_ids is not None:
                token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.delta.content:
                texts[c.index].append(c.delta.content)
            if c.delta.reasoning:
                thinking.setdefault(c.index, []).append(c.delta.reasoning)
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(c.index, {}).setdefault(tc.index, {"id": "", "name": "", "arguments": []})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] = tc.function.name or call["name"]
                    if tc.function.arguments:
                        call["arguments"].append(tc.function.arguments)
            if c.logprobs is not None and c.logprobs.content:
                lps.setdefault(c.index, []).extend(c.logprobs.content)
            if c.finish_reason is not None:
                finish[c.index] = c
    if first is None:
        raise ValueError("no chunks")
    choices = []
    for i in sorted(texts):
        tool_calls = [
            ToolCallOut(
                id=call["id"], function=FunctionCallOut(name=call["name"], arguments="".join(call["arguments"]))
            )
            for _, call in sorted(calls.get(i, {}).items())
        ]
        text = "".join(texts[i])
        message = AssistantMessage(content=text if text or not tool_calls else None, tool_calls=tool_calls or None,
                                   reasoning="".join(thinking[i]) if i in thinking else None)  # fmt: skip
        end = finish.get(i)
        choices.append(ChatChoice(
            index=i, message=message, logprobs=ChoiceLogprobs(content=lps[i]) if i in lps else None,
            finish_reason=end.finish_reason if end else None, stop_reason=end.stop_reason if end else None,
            token_ids=token_ids.get(i),
        ))  # fmt: skip
    return ChatCompletion(id=first.id, created=first.created, model=first.model, choices=choices, usage=usage,
                          prompt_logprobs=prompt_lps, prompt_token_ids=prompt_ids)  # fmt: skip


def chat_chunks(completion: ChatCompletion, include_usage: bool = False) -> list[ChatCompletionChunk]:
    """A whole chat.completion as the chunks a streaming server sends: role, reasoning, content, calls, finish."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                   choices=choices, usage=usage)  # fmt: skip

    out = []
    for c in completion.choices:
        out.append(chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))]))
        if c.message.reasoning:
            out.append(chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(reasoning=c.message.reasoning))]))
        if c.message.content or c.logprobs is not None:
            out.append(chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.message.content or ""),
                                              logprobs=c.logprobs)]))  # fmt: skip
        for j, call in enumerate(c.message.tool_calls or []):
            delta = ToolCallDelta(
                index=j,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
            )
            out.append(chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[delta]))]))  # fmt: skip
        out.append(chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason)]))  # fmt: skip
    if include_usage and completion.usage is not None:
        out.append(chunk([], completion.usage))
    return out


# -- text completions --------------------------------------------------------------------------


def merge_completion_chunks(chunks: Iterable[Completion], usage: Usage | None = None) -> Completion:
    """The text_completion that a stream of text_completion chunks adds up to."""
    first: Completion | None = None
    texts: dict[int, list[str]] = {}
    lps: dict[int, CompletionLogprobs] = {}
    finish: dict[int, CompletionChoice] = {}
    prompt_lps: dict[int, list] = {}
    prompt_ids: dict[int, list[int]] = {}
    token_ids: dict[int, list[int]] = {}
    for chunk in chunks:
        first = first or chunk
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts.setdefault(c.index, []).append(c.text)
            if c.prompt_token_ids is not None:
                prompt_ids[c.index] = c.prompt_token_ids
            if c.token_ids is not None:
                token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                acc = lps.setdefault(c.index, CompletionLogprobs())
                acc.tokens += c.logprobs.tokens
                acc.token_logprobs += c.logprobs.token_logprobs
                acc.top_logprobs += c.logprobs.top_logprobs
                acc.text_offset += c.logprobs.text_offset
            if c.finish_reason is not None:
                finish[c.index] = c
            if c.prompt_logprobs is not None:
                prompt_lps[c.index] = c.prompt_logprobs
    if first is None:
        raise ValueError("no chunks")
    choices = [
        CompletionChoice(
            index=i,
            text="".join(t),
            logprobs=lps.get(i),
            finish_reason=finish[i].finish_reason if i in finish else None,
            stop_reason=finish[i].stop_reason if i in finish else None,
            prompt_logprobs=prompt_lps.get(i),
            prompt_token_ids=prompt_ids.get(i),
            token_ids=token_ids.get(i),
        )  # fmt: skip
        for i, t in sorted(texts.items())
    ]
    return Completion(id=first.id, created=first.created, model=first.model, choices=choices, usage=usage)


def completion_chunks(completion: Completion, include_usage: bool = False) -> list[Completion]:
    """A whole text_completion as the chunks a streaming server sends: text, then the finish."""

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=completion.id, created=completion.created, model=completion.model, choices=choices,
                          usage=usage)  # fmt: skip

    out = []
    for c in completion.choices:
        out.append(chunk([CompletionChoice(index=c.index, text=c.text, logprobs=c.logprobs)]))
        out.append(chunk([CompletionChoice(index=c.index, text="", finish_reason=c.finish_reason,
                                           stop_reason=c.stop_reason)]))  # fmt: skip
    if include_usage and completion.usage is not None:
        out.append(chunk([], completion.usage))
    return out
