"""The Anthropic Messages API (``/v1/messages``): the request, its translation into a chat request,
the reply, the stream of events, and Anthropic's error shape.

::

    MessagesRequest ──to_chat()──▶ ChatCompletionRequest ──▶ the chat path (template, tools, grammar)
    engine outputs ─▶ ChatStream ─▶ chat chunks ─▶ MessageEvents ─▶ message_start, content_block_*,
                                                                 message_delta, message_stop
                                                            └──▶ the whole message (stream: false)
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, StrictBool, StrictInt, Tag

from agora.openai.chat import ChatCompletionChunk, ChatCompletionRequest
from agora.openai.common import Number, OpenModel, StrictModel, Usage, first_error, new_id, text_parts_only
from agora.openai.errors import APIError, bad_request
from agora.openai.reasoning import Reasoning

MAX_STOP_SEQUENCES = 16
MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking.budget_tokens

# OpenAI error types (and the status) as Anthropic names them
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}  # fmt: skip


def anthropic_error(exc: APIError) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error in Anthropic's shape; an overloaded engine is Anthropic's 529."""
    kind = _ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    status = 529 if exc.status == 503 else exc.status
    return status, {"type": "error", "error": {"type": kind, "message": exc.message}}


# -- request --------------------------------------------------------------------------------------


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # agora caches every prefix: honoured without asking
    citations: list[Any] | None = None


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] | None = None
    is_error: StrictBool | None = None
    cache_control: dict[str, Any] | None = None

    _parts = text_parts_only("content", accepted=("text",))

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(StrictModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(StrictModel):
    type: Literal["redacted_thinking"]
    data: str


def _block_kind(value: Any) -> str:
    return value.get("type", "") if isinstance(value, dict) else getattr(value, "type", "")


Block = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")] | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")],
    Discriminator(_block_kind),
]  # fmt: skip


BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: list[Block] | str

    _parts = text_parts_only("content", accepted=BLOCK_TYPES)


class Tool(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: StrictBool | None = None
    input_examples: list[dict[str, Any]] | None = None  # shown to the model with the description
    eager_input_streaming: StrictBool | None = None  # inputs always stream as they are written
    defer_loading: StrictBool | None = None
    allowed_callers: list[Any] | None = None

    def described(self) -> str | None:
        if not self.input_examples:
            return self.description
        examples = "\n".join(json.dumps(e, ensure_ascii=False) for e in self.input_examples)
        return f"{self.description or ''}\nExample inputs:\n{examples}".strip()


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None


class Metadata(StrictModel):
    user_id: str | None = Field(default=None, max_length=256)


class OutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictModel):
    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(StrictModel):
    model: str
    max_tokens: StrictInt
    messages: list[Message]
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: Number | None = Field(default=None, ge=0, le=1)
    top_p: Number | None = None
    top_k: StrictInt | None = None
    metadata: Metadata | None = None
    stream: StrictBool = False
    thinking: Thinking | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # agora caches every prefix: honoured without asking
    speed: Literal["standard", "fast"] | None = None
    container: Any = None
    inference_geo: str | None = None
    diagnostics: Any = None
    mcp_servers: Any = None
    context_management: dict[str, Any] | None = None

    _system_parts = text_parts_only("system", accepted=("text",))
    counting: ClassVar[bool] = False  # count_tokens: no max_tokens to measure a thinking budget against

    def check(self) -> None:
        """What agora does not do, named (a 400 in Anthropic's shape)."""
        for name in ("container", "inference_geo", "diagnostics", "mcp_servers"):
            if getattr(self, name) is not None and getattr(self, name) != []:  # no MCP servers is what agora has
                raise bad_request(name, f"{name} is not supported")
        for edit in (self.context_management or {}).get("edits") or []:
            # thinking from earlier turns never reaches the model here (templates drop it), so clearing it holds
            if not (isinstance(edit, dict) and str(edit.get("type", "")).startswith("clear_thinking")):
                kind = edit.get("type") if isinstance(edit, dict) else edit
                raise bad_request("context_management", f"context_management edit {kind!r} is not supported")
        if self.speed == "fast":
            raise bad_request("speed", "speed 'fast' is not available")
        if self.output_config is not None and self.output_config.effort is not None:
            raise bad_request("output_config", "output_config.effort is not supported by this model")
        for t in self.custom_tools():
            if t.defer_loading or t.allowed_callers:
                raise bad_request("tools", f"tool {t.name!r}: defer_loading and allowed_callers are not supported")

    def custom_tools(self) -> list[Tool]:
        out = []
        for t in self.tools or []:
            kind = t.get("type")
            if kind not in (None, "custom"):
                raise bad_request("tools", f"the server tool {kind!r} is not available here: give custom tools "
                                           "with an input_schema")  # fmt: skip
            try:
                out.append(Tool.model_validate(t))
            except ValueError as exc:
                raise bad_request("tools", f"tools: {first_error(exc)}") from None
        return out

    def to_chat(self, reasoning: Reasoning | None) -> ChatCompletionRequest:
        """The chat request this message is. ``reasoning``: the served model's (None: it does not reason).
        Thinking blocks come back only where ``thinking`` asks for them; a model with a switch thinks only then."""
        if self.max_tokens < 1:
            raise bad_request("max_tokens", "max_tokens: must be at least 1")
        if len(self.stop_sequences or []) > MAX_STOP_SEQUENCES:
            raise bad_request("stop_sequences", f"stop_sequences: at most {MAX_STOP_SEQUENCES}")
        if not self.messages:
            raise bad_request("messages", "messages: at least one message is required")
        self.check()
        kind = self.thinking.type if self.thinking is not None else None
        budget = self.thinking.budget_tokens if kind == "enabled" and self.thinking is not None else None
        if budget is not None and (budget < MIN_THINKING_BUDGET or (budget >= self.max_tokens and not self.counting)):
            raise bad_request("thinking", f"thinking.budget_tokens must be at least {MIN_THINKING_BUDGET} and less "
                                          f"than max_tokens ({self.max_tokens}), got {budget}")  # fmt: skip
        if kind == "enabled" and reasoning is None:
            raise bad_request("thinking", "thinking is not supported by this model (it does not reason: its chat "
                                          "template has no thinking mode); Claude Code: set MAX_THINKING_TOKENS=0")  # fmt: skip
        thinking = reasoning is not None and kind in ("enabled", "adaptive")
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        uses: set[str] = set()
        for i, m in enumerate(self.messages):
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            if m.role == "assistant":
                text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
                calls = [{"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                         for b in blocks if isinstance(b, ToolUseBlock)]  # fmt: skip
                uses.update(c["id"] for c in calls)
                msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
                if calls:
                    msg["tool_calls"] = calls
                if thought := "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock)):
                    msg["reasoning"] = thought
                messages.append(msg)
                continue
            for b in blocks:
                if isinstance(b, ToolResultBlock):
                    if b.tool_use_id not in uses:
                        raise bad_request("messages", f"messages.{i}: tool_result block {b.tool_use_id!r} answers no "
                                                      "tool_use block of an earlier assistant message")  # fmt: skip
                    messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
                elif isinstance(b, ToolUseBlock):
                    raise bad_request("messages", f"messages.{i}: tool_use blocks belong to assistant messages")
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                messages.append({"role": "user", "content": text})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "stream": self.stream, "include_reasoning": thinking}  # fmt: skip
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        if self.metadata is not None and self.metadata.user_id:
            body["user"] = self.metadata.user_id
        if reasoning is not None and reasoning.switch:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        if budget is not None:
            body["thinking_token_budget"] = budget
        tools = self.custom_tools()
        if tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.described(),
                                                               "parameters": t.input_schema, "strict": t.strict}}
                             for t in tools]  # fmt: skip
        if self.output_config is not None and self.output_config.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": self.output_config.format.schema_}}  # fmt: skip
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool":
                if not choice.name:
                    raise bad_request("tool_choice", "tool_choice: type 'tool' needs a name")
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
            body["continue_final_message"] = True  # a prefilled reply: the model goes on from it
            body["add_generation_prompt"] = False
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValueError as exc:
            raise bad_request("messages", f"messages: {first_error(exc)}") from None


class CountTokensRequest(MessagesRequest):
    """``/v1/messages/count_tokens``: a message request without ``max_tokens``."""

    max_tokens: StrictInt = 1
    counting: ClassVar[bool] = True


# Chat parameter names as this API calls them.
RENAME = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "user": "metadata",
          "thinking_token_budget": "thinking",
          "parallel_tool_calls": "tool_choice", "response_format": "output_config"}  # fmt: skip


# -- the reply and its stream ---------------------------------------------------------------------


class MessageUsage(OpenModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def of(cls, usage: Usage) -> MessageUsage:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return cls(input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens,
                   cache_read_input_tokens=cached)  # fmt: skip


class Reply(OpenModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]] = Field(default_factory=list)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: MessageUsage = Field(default_factory=MessageUsage)


_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}


class MessageEvents:
    """Chat chunks of one choice -> Anthropic's event stream, and the message they build."""

    def __init__(self, reply: Reply, prompt_tokens: int) -> None:
        self.reply = reply
        self.prompt_tokens = prompt_tokens
        self.open: str | None = None  # the kind of the block being written: text, thinking, tool_use
        self.calls: dict[int, int] = {}  # chat call index -> block index
        self.args: dict[int, str] = {}  # block index -> the arguments' JSON so far

    def start(self) -> list[dict[str, Any]]:
        head = self.reply.model_dump(mode="json")
        head["usage"] = {**head["usage"], "input_tokens": self.prompt_tokens, "output_tokens": 0}
        return [{"type": "message_start", "message": head}, {"type": "ping"}]

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        index = len(self.reply.content) - 1
        self.open = None
        block = self.reply.content[index]
        if block["type"] == "tool_use":
            try:
                block["input"] = json.loads(self.args.get(index) or "{}")
            except ValueError:
                block["input"] = {}
        return [{"type": "content_block_stop", "index": index}]

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open != kind:
            events += self._close()
            block = {"type": kind, kind: ""} if kind == "thinking" else {"type": "text", "text": ""}
            if kind == "thinking":
                block["signature"] = ""
            self.reply.content.append(block)
            self.open = kind
            events.append({"type": "content_block_start", "index": len(self.reply.content) - 1,
                           "content_block": dict(block)})  # fmt: skip
        index = len(self.reply.content) - 1
        self.reply.content[index][kind if kind == "thinking" else "text"] += text
        delta = (
            {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        )
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def feed(self, chunk: ChatCompletionChunk) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning:
                events += self._text("thinking", delta.reasoning)
            if delta.content:
                events += self._text("text", delta.content)
            for tc in delta.tool_calls or []:
                if tc.index not in self.calls:
                    events += self._close()
                    name = tc.function.name if tc.function is not None else ""
                    block = {"type": "tool_use", "id": tc.id or new_id("toolu", 12), "name": name or "", "input": {}}
                    self.reply.content.append(block)
                    self.calls[tc.index] = len(self.reply.content) - 1
                    self.open = "tool_use"
                    events.append({"type": "content_block_start", "index": self.calls[tc.index],
                                   "content_block": dict(block)})  # fmt: skip
                piece = tc.function.arguments if tc.function is not None else None
                if piece:
                    index = self.calls[tc.index]
                    self.args[index] = self.args.get(index, "") + piece
                    events.append({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}})  # fmt: skip
            if choice.finish_reason is not None:
                stop = choice.stop_reason if isinstance(choice.stop_reason, str) else None
                self.reply.stop_reason = "stop_sequence" if stop and choice.finish_reason == "stop" else \
                    _STOP.get(choice.finish_reason, "end_turn")  # fmt: skip
                self.reply.stop_sequence = stop if self.reply.stop_reason == "stop_sequence" else None
        return events

    def finish(self, usage: Usage) -> list[dict[str, Any]]:
        events = self._close()
        self.reply.usage = MessageUsage.of(usage)
        delta = {"stop_reason": self.reply.stop_reason or "end_turn", "stop_sequence": self.reply.stop_sequence}
        # cumulative, as Anthropic's: the prompt's cached part is known only now (message_start counted it all
        # as input), and the SDKs take each count given here over message_start's
        return events + [
            {"type": "message_delta", "delta": delta, "usage": self.reply.usage.model_dump(mode="json")},
            {"type": "message_stop"},
        ]

    def failed(self, message: str) -> list[dict[str, Any]]:
        return [{"type": "error", "error": {"type": "overloaded_error", "message": message}}]

    @property
    def result(self) -> Reply:
        return self.reply


# -- whole replies and their events (the gateway's cache reads relayed answers and replays them) -----


def reply_from_sse(payload: str) -> Reply | None:
    """A relayed Messages stream folded into the whole reply; None unless it ran to message_stop."""
    from agora.openai.stream import sse_data

    reply: Reply | None = None
    args: dict[int, str] = {}
    for data in sse_data(payload):
        event = json.loads(data)
        kind = event.get("type")
        if kind == "message_start":
            reply = Reply.model_validate(event["message"])
        elif reply is None:
            return None
        elif kind == "content_block_start":
            reply.content.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = reply.content[event["index"]], event["delta"]
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif delta.get("type") == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif delta.get("type") == "input_json_delta":
                args[event["index"]] = args.get(event["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and event["index"] in args:
            reply.content[event["index"]]["input"] = json.loads(args[event["index"]] or "{}")
        elif kind == "message_delta":
            reply.stop_reason = event["delta"].get("stop_reason")
            reply.stop_sequence = event["delta"].get("stop_sequence")
            usage = event.get("usage") or {}  # cumulative counts: each one given replaces message_start's
            reply.usage = reply.usage.model_copy(update={k: v for k, v in usage.items() if isinstance(v, int)})
        elif kind == "message_stop":
            return reply
    return None


def reply_events(reply: Reply) -> list[dict[str, Any]]:
    """A whole reply as the events a streaming server sends."""
    head = reply.model_dump(mode="json")
    head.update(content=[], stop_reason=None, stop_sequence=None)
    head["usage"] = {**head["usage"], "output_tokens": 0}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": head}, {"type": "ping"}]
    for i, block in enumerate(reply.content):
        kind = block.get("type")
        start = {**block, "input": {}} if kind == "tool_use" else {**block, kind: ""} if kind in ("text", "thinking") \
            else block  # fmt: skip
        events.append({"type": "content_block_start", "index": i, "content_block": start})
        if kind == "text":
            delta = {"type": "text_delta", "text": block.get("text", "")}
        elif kind == "thinking":
            delta = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
        else:
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input", {}), ensure_ascii=False)}
        events.append({"type": "content_block_delta", "index": i, "delta": delta})
        events.append({"type": "content_block_stop", "index": i})
    events.append({"type": "message_delta", "delta": {"stop_reason": reply.stop_reason,
                   "stop_sequence": reply.stop_sequence}, "usage": reply.usage.model_dump(mode="json")})  # fmt: skip
    events.append({"type": "message_stop"})
    return events
