"""Chat Completions: the request, the response, the stream chunk.

The request model checks everything that needs no engine: types, unknown fields,
tools and tool_choice, and the parameters agora does not implement (a 400 naming
each). Sampling ranges are checked by the engine's ``SamplingParams``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, StrictBool, StrictInt, field_validator, model_validator

from agora.openai.common import (
    ChoiceLogprobs,
    OpenModel,
    SamplingFields,
    StrictModel,
    Usage,
    check_prompt_cache,
    omitted,
    text_parts_only,
)
from agora.openai.errors import bad_request
from agora.schemas import schema_problem

MAX_TOOLS = 128
MAX_TOOL_SCHEMA_BYTES = 64 << 10
MAX_DOCUMENTS_BYTES = 1 << 20
# Arguments of the tokenizer's apply_chat_template, not variables of the template: a request does not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})  # fmt: skip
TOOL_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:"


# -- request -------------------------------------------------------------------------------


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class RefusalPart(StrictModel):
    type: Literal["refusal"]
    refusal: str


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)
    refusal: str | None = None
    reasoning: str | None = None  # an assistant turn's thinking, as vLLM sends it back (reasoning_content: as
    reasoning_content: str | None = None  # DeepSeek and older vLLM do); the template writes it where it may

    _parts = text_parts_only("content", accepted=("text", "refusal"))

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant"):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        parts = self.content if isinstance(self.content, list) else []  # (a string is not walked by character)
        refused = self.refusal is not None or any(isinstance(p, RefusalPart) for p in parts)
        if refused and self.role != "assistant":
            raise ValueError("only assistant messages carry a refusal")
        if (self.reasoning is not None or self.reasoning_content is not None) and self.role != "assistant":
            raise ValueError("only assistant messages carry reasoning")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def thinking(self) -> str | None:
        """An assistant turn's reasoning, whichever field it came in."""
        return self.reasoning if self.reasoning is not None else self.reasoning_content

    def text(self) -> str:
        """What the message says; an assistant's refusal is what it said."""
        content = self.content
        if isinstance(content, list):
            return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in content)
        return content or self.refusal or ""


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if any(c not in TOOL_NAME_CHARS for c in value):
            raise ValueError("a function name may hold only letters, digits, '_', '-', '.' and ':'")
        return value

    def schema_(self) -> dict[str, Any]:
        """The arguments' JSON schema (an object with no properties when none is given)."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(StrictModel):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(StrictModel):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice


class ToolUse:
    """What the request asks of tools, resolved: the tools offered and how they must be used.

    ``mode`` is ``"none"`` (no tools in the prompt, no parsing), ``"auto"`` (the model
    decides; calls are parsed out of its text; strict tools are constrained once a call
    starts), ``"required"`` (at least one call, enforced by a grammar) or ``"named"``
    (exactly one call of ``tools[0]``, enforced by a grammar).
    """

    def __init__(self, tools: list[FunctionDefinition], mode: str, parallel: bool) -> None:
        self.tools, self.mode, self.parallel = tools, mode, parallel

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named") or (self.mode == "auto" and any(t.strict for t in self.tools))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=256)  # the gateway's session for cache affinity
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = Field(default=None, max_length=256)
    verbosity: str | None = None
    # vLLM's extras
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    documents: list[dict[str, str]] | None = None  # for templates that take them (RAG), as vLLM passes them
    add_special_tokens: StrictBool = False  # the template writes the BOS token itself
    echo: StrictBool = False  # the reply starts with the final message's text, when that message is the assistant's
    include_reasoning: StrictBool = True  # a reasoning model's thinking in the answer (vLLM's field)
    thinking_token_budget: StrictInt | None = None  # vLLM's: at most this many tokens of thinking

    def check(self) -> None:
        """Every 400 that needs no engine: unimplemented parameters, conflicting ones."""
        self.check_common()
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                hint = " (use tools and tool_choice)" if name.startswith("function") else ""
                raise bad_request(name, f"{name} is not supported{hint}")
        if self.modalities is not None and self.modalities != ["text"]:
            raise bad_request("modalities", "only the text modality is supported")
        if self.store:
            raise bad_request("store", "store is not supported")
        if self.service_tier not in (None, "auto", "default"):
            raise bad_request("service_tier", "service_tier: only 'auto' and 'default' are available")
        check_prompt_cache(self.prompt_cache_retention, self.prompt_cache_options)
        if self.verbosity not in (None, "medium"):  # OpenAI's answer for its models without the setting
            raise bad_request("verbosity", f"verbosity {self.verbosity!r} is not supported by this model; "
                                           "only 'medium' is")  # fmt: skip
        if self.chat_template is not None:
            raise bad_request("chat_template", "a chat template from the request is not accepted: the server "
                                               "renders the model's own")  # fmt: skip
        if self.documents and len(json.dumps(self.documents)) > MAX_DOCUMENTS_BYTES:
            raise bad_request("documents", f"documents are larger than {MAX_DOCUMENTS_BYTES} bytes")
        if not self.messages:
            raise bad_request("messages", "messages must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.chat_template_kwargs and len(json.dumps(self.chat_template_kwargs, default=str)) > 4096:
            raise bad_request("chat_template_kwargs", "chat_template_kwargs is too large")
        if reserved := sorted(set(self.chat_template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS):
            # chat_template among them would render a template the client wrote (a loop of loops holds a thread)
            raise bad_request("chat_template_kwargs", f"chat_template_kwargs may not set {reserved[0]!r}: it is "
                                                      "the server's (or a request field of its own)")  # fmt: skip
        if self.continue_final_message and (not self.messages or self.messages[-1].role != "assistant"):
            raise bad_request("continue_final_message", "continue_final_message needs a final assistant message")
        use = self.tool_use()
        if use.active and self.continue_final_message:
            raise bad_request("continue_final_message", "continue_final_message cannot be combined with tools")
        if use.mode in ("required", "named") and self.constraint() is not None:
            raise bad_request("response_format", "a required or named tool_choice already fixes the output; "
                                                 "drop response_format")  # fmt: skip

    def echo_text(self) -> str:
        """vLLM's chat ``echo``: the reply starts with the final message's text where the assistant wrote it."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    _tool_use: ToolUse | None = PrivateAttr(default=None)

    def tool_use(self) -> ToolUse:
        """The tools and how they are to be used, resolved and checked once per request."""
        if self._tool_use is None:
            self._tool_use = self._resolve_tools()
        return self._tool_use

    def _resolve_tools(self) -> ToolUse:
        tools = [t.function for t in self.tools or []]
        if len(tools) > MAX_TOOLS:
            raise bad_request("tools", f"at most {MAX_TOOLS} tools per request")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise bad_request("tools", "tool names must be unique")
        for t in tools:
            if t.parameters is None:
                continue
            if len(json.dumps(t.parameters)) > MAX_TOOL_SCHEMA_BYTES:
                raise bad_request("tools", f"the parameters of tool {t.name!r} are larger than "
                                           f"{MAX_TOOL_SCHEMA_BYTES} bytes")  # fmt: skip
            problem = schema_problem(t.parameters)
            if problem is not None:
                raise bad_request("tools", f"the parameters of tool {t.name!r}: {problem}")
        parallel = self.parallel_tool_calls is not False
        choice = self.tool_choice
        if choice is None:
            return ToolUse(tools, "auto" if tools else "none", parallel)
        if not tools and choice != "none":
            raise bad_request("tool_choice", "tool_choice needs tools")
        if isinstance(choice, str):
            return ToolUse(tools, choice, parallel)
        if isinstance(choice, NamedToolChoice):
            picked = [t for t in tools if t.name == choice.function.name]
            if not picked:
                raise bad_request("tool_choice", f"tool_choice names {choice.function.name!r}, which is not "
                                                 "among the tools")  # fmt: skip
            return ToolUse(picked, "named", False)
        allowed = set()
        for ref in choice.allowed_tools.tools:
            name = (ref.get("function") or {}).get("name") if isinstance(ref.get("function"), dict) else ref.get("name")
            if ref.get("type") != "function" or not isinstance(name, str):
                raise bad_request("tool_choice", "allowed_tools.tools lists {\"type\": \"function\", "
                                                 "\"function\": {\"name\": ...}} entries")  # fmt: skip
            if name not in names:
                raise bad_request("tool_choice", f"allowed_tools names {name!r}, which is not among the tools")
            allowed.add(name)
        return ToolUse([t for t in tools if t.name in allowed], choice.allowed_tools.mode, parallel)


# -- response --------------------------------------------------------------------------------


class FunctionCallOut(OpenModel):
    name: str
    arguments: str


class ToolCallOut(OpenModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(OpenModel):
    role: Literal["assistant"] = "assistant"
    reasoning: str | None = omitted()  # a reasoning model's thinking (vLLM's field)
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = omitted()


class ChatChoice(OpenModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended the choice
    token_ids: list[int] | None = omitted()  # vLLM's return_token_ids: the choice's tokens


class ChatCompletion(OpenModel):
    id: str = ""  # defaults: other servers' answers are read leniently (the cache replays them with fresh ones)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice]
    usage: Usage | None = omitted()
    prompt_logprobs: list[dict[str, Any] | None] | None = omitted()  # vLLM's, when asked for
    prompt_token_ids: list[int] | None = omitted()  # vLLM's return_token_ids


class FunctionCallDelta(OpenModel):
    name: str | None = omitted()
    arguments: str | None = omitted()


class ToolCallDelta(OpenModel):
    index: int
    id: str | None = omitted()
    type: Literal["function"] | None = omitted()
    function: FunctionCallDelta | None = omitted()


class ChatDelta(OpenModel):
    role: Literal["assistant"] | None = omitted()
    reasoning: str | None = omitted()
    content: str | None = omitted()
    tool_calls: list[ToolCallDelta] | None = omitted()


class ChatChunkChoice(OpenModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = omitted()
    token_ids: list[int] | None = omitted()  # vLLM's return_token_ids: this chunk's tokens


class ChatCompletionChunk(OpenModel):
    id: str = ""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice]
    usage: Usage | None = omitted()
    prompt_logprobs: list[dict[str, Any] | None] | None = omitted()  # carried to the whole answer (never streamed)
    prompt_token_ids: list[int] | None = omitted()  # vLLM's return_token_ids: on the first chunk
