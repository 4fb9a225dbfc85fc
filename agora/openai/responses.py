"""The OpenAI Responses API (``/v1/responses``): the request, its translation into a chat request,
the response object, and the stream of events.

::

    ResponsesRequest ──to_chat()──▶ ChatCompletionRequest (messages, tools, response_format)
        (stored items of previous_response_id first)          │ the chat path: template, tools, grammar
                                                              ▼
    engine outputs ─▶ ChatStream ─▶ chat chunks ─▶ ResponseEvents ─▶ response.* events (stream: true)
                                                              └──▶ the Response (stream: false, and stored)

One accumulator (the chat one) and one translation of its chunks, so a streamed response and a
whole one cannot differ: the whole one is the last event's ``response``.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, StrictInt, Tag, field_validator

from agora.openai.chat import ChatCompletionChunk, ChatCompletionRequest
from agora.openai.common import (
    Number,
    OpenModel,
    StrictModel,
    Usage,
    check_prompt_cache,
    first_error,
    new_id,
    omitted,
    text_parts_only,
)
from agora.openai.errors import bad_request

MAX_INPUT_ITEMS = 4096
MAX_METADATA = 16
HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "computer",
                "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom",
                "tool_search", "namespace", "programmatic_tool_calling")  # fmt: skip


# -- request --------------------------------------------------------------------------------------


TEXT_PART_TYPES = ("input_text", "output_text", "text")
LOGPROBS = "message.output_text.logprobs"  # the include that asks for the output text's logprobs


class TextPart(StrictModel):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # output_text parts replayed from an earlier response
    logprobs: list[Any] | None = None


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    _parts = text_parts_only("content", accepted=TEXT_PART_TYPES)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    _parts = text_parts_only("output", accepted=TEXT_PART_TYPES)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class SummaryPart(StrictModel):
    type: Literal["summary_text"]
    text: str


class ReasoningTextPart(StrictModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(StrictModel):
    """A reasoning item sent back: its thinking goes to the assistant turn after it (a reasoning model's
    template writes it where the model expects it, mid tool loop)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryPart] = Field(default_factory=list)
    content: list[ReasoningTextPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None

    def text(self) -> str:
        if self.content:
            return "".join(p.text for p in self.content)
        if self.encrypted_content is not None and (text := reasoning_from_blob(self.encrypted_content)) is not None:
            return text
        return "\n".join(p.text for p in self.summary)


# encrypted_content of agora's reasoning items: the text itself, since agora shows the thinking anyway (OpenAI
# hides it); a client keeping no store (store: false, Codex) sends it back to carry the thinking between turns
_BLOB = "agora-reasoning-v1:"


def reasoning_blob(text: str) -> str:
    return _BLOB + base64.b64encode(text.encode()).decode()


def reasoning_from_blob(blob: str) -> str | None:
    """The text of an ``encrypted_content`` agora wrote (another server's cannot be read: None)."""
    if not blob.startswith(_BLOB):
        return None
    try:
        return base64.b64decode(blob[len(_BLOB) :], validate=True).decode()
    except ValueError:
        return None


def _item_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "message")  # an "easy" message has no type
    return getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]  # fmt: skip


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: str | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(StrictModel):
    include_obfuscation: StrictBool = False


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    max_output_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    store: StrictBool = True
    previous_response_id: str | None = Field(default=None, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    background: StrictBool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: StrictInt | None = None
    top_logprobs: StrictInt | None = None
    context_management: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    client_metadata: dict[str, str] | None = None  # the client's own labels (Codex: thread and turn ids)

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_INPUT_ITEMS:
            raise ValueError(f"at most {MAX_INPUT_ITEMS} input items")
        return value

    def wants_logprobs(self) -> bool:
        """The output text's tokens with their logprobs (``include``), and ``top_logprobs`` alternatives each."""
        return LOGPROBS in (self.include or []) or self.top_logprobs is not None

    def check(self) -> None:
        """The 400s that need no engine: what agora does not implement, named."""
        for name in ("conversation", "prompt", "context_management"):
            if getattr(self, name) is not None:
                raise bad_request(name, f"{name} is not supported")
        check_prompt_cache(self.prompt_cache_retention, self.prompt_cache_options)
        if self.background:
            raise bad_request("background", "background responses are not supported")
        # Agents ask for the encrypted reasoning of reasoning models: reasoning items carry it (reasoning_blob).
        unsupported = [i for i in self.include or [] if i not in ("reasoning.encrypted_content", LOGPROBS)]
        if unsupported:
            raise bad_request("include", f"include {unsupported[0]!r} is not supported")
        # the effort is the model's to honour (Serving.template_kwargs); a summary is asked for by Codex, and
        # agora's reasoning items carry the whole thinking in their content instead
        extra = set(self.reasoning or {}) - {"effort", "summary", "generate_summary"}
        if extra:
            raise bad_request("reasoning", f"reasoning.{sorted(extra)[0]} is not supported")
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and not isinstance(effort, str):
            raise bad_request("reasoning", "reasoning.effort must be a string")
        if self.service_tier not in (None, "auto", "default"):
            raise bad_request("service_tier", "service_tier: only 'auto' and 'default' are available")
        if self.max_tool_calls is not None and self.max_tool_calls < 0:  # it caps built-in tools' calls: none here
            raise bad_request("max_tool_calls", "max_tool_calls must be at least 0")
        if self.stream_options is not None and (not self.stream or self.stream_options.include_obfuscation):
            raise bad_request("stream_options", "stream_options: only include_obfuscation false, with stream true")
        if self.text is not None and self.text.verbosity not in (None, "medium"):  # as chat's verbosity
            raise bad_request("text", f"text.verbosity {self.text.verbosity!r} is not supported by this model; "
                                      "only 'medium' is")  # fmt: skip
        if self.metadata is not None and (len(self.metadata) > MAX_METADATA or any(
                len(k) > 64 or len(v) > 512 for k, v in self.metadata.items())):  # fmt: skip
            raise bad_request("metadata", f"metadata: at most {MAX_METADATA} keys of 64 characters, values of 512")
        if isinstance(self.input, str) and not self.input:
            raise bad_request("input", "input must not be empty")

    def function_tools(self) -> list[FunctionTool]:
        out = []
        for t in self.tools or []:
            kind = t.get("type")
            if kind in HOSTED_TOOLS:
                raise bad_request("tools", f"the built-in tool {kind!r} is not available here: give function tools")
            try:
                out.append(FunctionTool.model_validate(t))
            except ValueError as exc:
                raise bad_request("tools", f"tools: {first_error(exc)}") from None
        return out

    def chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            if isinstance(choice, str) and choice not in ("none", "auto", "required"):
                raise bad_request("tool_choice", f"tool_choice {choice!r} is not one of none, auto, required")
            return choice
        kind = choice.get("type")
        if kind == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if kind == "allowed_tools":
            tools = [{"type": "function", "function": {"name": t.get("name")}} for t in choice.get("tools") or []]
            return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": tools}}
        raise bad_request("tool_choice", f"tool_choice of type {kind!r} is not supported (function tools only)")

    def to_chat(self, history: list[dict[str, Any]], drop: int = 0) -> ChatCompletionRequest:
        """The chat request this response is: ``history`` (the stored items of the previous responses,
        as input items) then this request's input, behind its instructions. ``drop``: leave out that many
        items from the beginning (``truncation: auto``), and with them the outputs of calls they held."""
        items = (history + input_items(self))[drop:]
        if drop:
            called = {item["call_id"] for item in items if item.get("type") == "function_call"}
            items = [i for i in items if i.get("type") != "function_call_output" or i["call_id"] in called]
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        known_calls: set[str] = set()
        thought: list[str] = []  # reasoning items' text, for the assistant turn they lead to

        def assistant(msg: dict[str, Any]) -> dict[str, Any]:
            if thought:
                msg["reasoning"] = "\n".join(thought)
                thought.clear()
            messages.append(msg)
            return msg

        for item in items:
            kind = item.get("type", "message")
            if kind == "reasoning":
                if text := ReasoningItem.model_validate(item).text():
                    thought.append(text)
            elif kind == "message":
                msg = MessageItem.model_validate(item)
                if msg.role == "assistant":
                    assistant({"role": "assistant", "content": msg.text()})
                else:
                    thought.clear()  # reasoning that led to no answer of its own
                    messages.append({"role": msg.role, "content": msg.text()})
            elif kind == "function_call":
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
                known_calls.add(item["call_id"])
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and not thought:
                    last.setdefault("tool_calls", []).append(call)
                else:
                    assistant({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                if item["call_id"] not in known_calls:
                    raise bad_request("input", f"function_call_output {item['call_id']!r} answers no function_call "
                                               "in the input or the previous response")  # fmt: skip
                output = FunctionCallOutputItem.model_validate(item)
                messages.append({"role": "tool", "tool_call_id": output.call_id, "content": output.text()})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        if (self.reasoning or {}).get("effort") is not None:
            body["reasoning_effort"] = self.reasoning["effort"]
        if self.wants_logprobs():
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        tools = self.function_tools()
        if tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in tools]  # fmt: skip
        choice = self.chat_tool_choice()
        if choice is not None:
            body["tool_choice"] = choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
                "type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                       "strict": fmt.strict}}  # fmt: skip
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValueError as exc:
            raise bad_request("input", f"input: {first_error(exc)}") from None


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of item dicts (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return [item.model_dump(exclude_none=True) for item in req.input]


# Chat parameter names as this API calls them (for the engine's and the chat layer's 400s).
RENAME = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens",
          "max_completion_tokens": "max_output_tokens", "response_format": "text", "logprobs": "top_logprobs",
          "reasoning_effort": "reasoning"}  # fmt: skip


# -- response ---------------------------------------------------------------------------------------


class OutputText(OpenModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenModel):
    type: Literal["message"] = "message"
    id: str
    status: str = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallOut(OpenModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: str = "completed"


class ReasoningOut(OpenModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] = Field(default_factory=list)  # one reasoning_text part: the thinking
    encrypted_content: str | None = omitted()  # include: ["reasoning.encrypted_content"]
    status: str = "completed"


OutputItem = Annotated[OutputMessage | FunctionCallOut | ReasoningOut, Field(discriminator="type")]


class InputTokensDetails(OpenModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # the prompt's tokens computed here: agora caches every prefix it computes


class OutputTokensDetails(OpenModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=cached,
                                                           cache_write_tokens=usage.prompt_tokens - cached),
                   output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning))  # fmt: skip


class Response(OpenModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None

    @property
    def output_text(self) -> str:
        return "".join(p.text for item in self.output if isinstance(item, OutputMessage) for p in item.content)


def new_response(req: ResponsesRequest, model: str) -> Response:
    """The response object as it starts (status in_progress, no output), echoing the request."""
    given = req.text.model_dump(by_alias=True, exclude_none=True) if req.text is not None else {}
    text = {"format": {"type": "text"}, **given}  # the format is always echoed, as OpenAI's is
    return Response(
        id=new_id("resp"), created_at=int(time.time()), model=model, instructions=req.instructions,
        max_output_tokens=req.max_output_tokens, metadata=req.metadata or {},
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        store=req.store, temperature=req.temperature, text=text, tool_choice=req.tool_choice or "auto",
        tools=req.tools or [], top_p=req.top_p, user=req.user, truncation=req.truncation or "disabled",
        reasoning=req.reasoning,
    )  # fmt: skip


# -- stream events ------------------------------------------------------------------------------------


class ResponseEvents:
    """Chat chunks of one choice -> the Responses API's event sequence, and the response they build.

    ::

        response.created, response.in_progress
        thinking:      output_item.added (reasoning) → content_part.added → reasoning_text.delta* →
                       reasoning_text.done → content_part.done → output_item.done
        per text run:  output_item.added (message) → content_part.added → output_text.delta* →
                       output_text.done → content_part.done → output_item.done
        per call:      output_item.added (function_call) → function_call_arguments.delta* →
                       function_call_arguments.done → output_item.done
        response.completed | response.incomplete (max_output_tokens) | response.failed
    """

    def __init__(self, response: Response, encrypted: bool = False) -> None:
        """``encrypted``: reasoning items carry ``encrypted_content`` (``include``)."""
        self.response = response
        self.seq = 0
        self.encrypted = encrypted
        self.thought: ReasoningOut | None = None  # the reasoning item being written
        self.text: OutputMessage | None = None  # the message item being written
        self.call: FunctionCallOut | None = None  # the function call being written
        self.calls: dict[int, FunctionCallOut] = {}
        self.pending: list[dict[str, Any]] = []  # logprobs of tokens whose text has not come out yet

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return self.response.model_dump(mode="json")

    def start(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]  # fmt: skip

    def _index(self, item: Any) -> int:
        return self.response.output.index(item)

    def _close_thought(self) -> list[dict[str, Any]]:
        item, self.thought = self.thought, None
        if item is None:
            return []
        i, part = self._index(item), item.content[0]
        item.status = "completed"
        if self.encrypted:
            item.encrypted_content = reasoning_blob(part["text"])
        return [
            self._event("response.reasoning_text.done", item_id=item.id, output_index=i, content_index=0,
                        text=part["text"]),
            self._event("response.content_part.done", item_id=item.id, output_index=i, content_index=0,
                        part=dict(part)),
            self._event("response.output_item.done", output_index=i, item=item.model_dump(mode="json")),
        ]  # fmt: skip

    def _close_text(self) -> list[dict[str, Any]]:
        item, self.text = self.text, None
        if item is None:
            return []
        i, part = self._index(item), item.content[0]
        part.logprobs += self.pending
        self.pending = []
        item.status = "completed"
        return [
            self._event("response.output_text.done", item_id=item.id, output_index=i, content_index=0,
                        text=part.text, logprobs=part.logprobs),
            self._event("response.content_part.done", item_id=item.id, output_index=i, content_index=0,
                        part=part.model_dump(mode="json")),
            self._event("response.output_item.done", output_index=i, item=item.model_dump(mode="json")),
        ]  # fmt: skip

    def _close_call(self) -> list[dict[str, Any]]:
        item, self.call = self.call, None
        if item is None:
            return []
        i = self._index(item)
        item.status = "completed"
        return [
            self._event("response.function_call_arguments.done", item_id=item.id, output_index=i,
                        arguments=item.arguments, name=item.name),
            self._event("response.output_item.done", output_index=i, item=item.model_dump(mode="json")),
        ]  # fmt: skip

    def feed(self, chunk: ChatCompletionChunk) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.choices:
            delta = choice.delta
            if choice.logprobs is not None and choice.logprobs.content and not delta.tool_calls:
                self.pending += [lp.model_dump(mode="json") for lp in choice.logprobs.content]  # the chat shape's
            if delta.reasoning:
                self.pending = []  # the thinking's tokens: not output text
                if self.thought is None:
                    events += self._close_text() + self._close_call()
                    self.thought = ReasoningOut(id=new_id("rs"), status="in_progress",
                                                content=[{"type": "reasoning_text", "text": ""}])  # fmt: skip
                    self.response.output.append(self.thought)
                    i = self._index(self.thought)
                    events.append(self._event("response.output_item.added", output_index=i,
                                              item={**self.thought.model_dump(mode="json"), "content": []}))  # fmt: skip
                    events.append(self._event("response.content_part.added", item_id=self.thought.id,
                                              output_index=i, content_index=0,
                                              part={"type": "reasoning_text", "text": ""}))  # fmt: skip
                self.thought.content[0]["text"] += delta.reasoning
                events.append(self._event("response.reasoning_text.delta", item_id=self.thought.id,
                                          output_index=self._index(self.thought), content_index=0,
                                          delta=delta.reasoning))  # fmt: skip
            if delta.content:
                events += self._close_thought() + self._close_call()
                if self.text is None:
                    self.text = OutputMessage(id=new_id("msg"), status="in_progress", content=[OutputText()])
                    self.response.output.append(self.text)
                    i = self._index(self.text)
                    events.append(self._event("response.output_item.added", output_index=i,
                                              item={**self.text.model_dump(mode="json"), "content": []}))  # fmt: skip
                    events.append(self._event("response.content_part.added", item_id=self.text.id, output_index=i,
                                              content_index=0, part=OutputText().model_dump(mode="json")))  # fmt: skip
                self.text.content[0].text += delta.content
                lps, self.pending = self.pending, []
                self.text.content[0].logprobs += lps
                events.append(self._event("response.output_text.delta", item_id=self.text.id,
                                          output_index=self._index(self.text), content_index=0, delta=delta.content,
                                          logprobs=lps))  # fmt: skip
            for tc in delta.tool_calls or []:
                if tc.index not in self.calls:
                    self.pending = []  # the call's markup tokens: not output text
                    events += self._close_thought() + self._close_text() + self._close_call()
                    name = tc.function.name if tc.function is not None else None
                    self.call = FunctionCallOut(id=new_id("fc"), call_id=tc.id or new_id("call"), name=name or "",
                                                status="in_progress")  # fmt: skip
                    self.calls[tc.index] = self.call
                    self.response.output.append(self.call)
                    events.append(self._event("response.output_item.added", output_index=self._index(self.call),
                                              item=self.call.model_dump(mode="json")))  # fmt: skip
                piece = tc.function.arguments if tc.function is not None else None
                if piece:
                    call = self.calls[tc.index]
                    call.arguments += piece
                    events.append(self._event("response.function_call_arguments.delta", item_id=call.id,
                                              output_index=self._index(call), delta=piece))  # fmt: skip
            if choice.finish_reason is not None:
                events += self._close_thought() + self._close_text() + self._close_call()
                if choice.finish_reason == "length":
                    self.response.status = "incomplete"
                    self.response.incomplete_details = {"reason": "max_output_tokens"}
                else:
                    self.response.status = "completed"
        return events

    def finish(self, usage: Usage) -> list[dict[str, Any]]:
        events = self._close_thought() + self._close_text() + self._close_call()
        self.response.usage = ResponseUsage.of(usage)
        if self.response.status == "in_progress":
            self.response.status = "completed"
        kind = "response.incomplete" if self.response.status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=self._snapshot())]

    @property
    def result(self) -> Response:
        return self.response

    def failed(self, message: str) -> list[dict[str, Any]]:
        self.response.status = "failed"
        self.response.error = {"code": "server_error", "message": message}
        return [self._event("response.failed", response=self._snapshot())]
