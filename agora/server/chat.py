"""``POST /v1/chat/completions``: parse, check, render the chat template, submit, answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from agora.engine.client import OutputStream
from agora.engine.sampling import ParamError, SamplingParams
from agora.openai.accumulate import ChatStream
from agora.openai.chat import ChatCompletionRequest
from agora.openai.errors import APIError, bad_request
from agora.openai.reasoning import CLOSE, NOT_THINKING, OPEN, OPENED, Reasoning
from agora.openai.stream import merge_chat_chunks
from agora.server.http import json_body
from agora.server.params import param_error, sampling_params, strict_schema, structured_params
from agora.server.serving import OpenAIAnswer, Serving, prompt_header
from agora.server.tools import ChatTools, chat_tools, with_thinking

# Chat has no "prompt": engine errors about it are about the messages; logprobs are top_logprobs here.
RENAME = {"prompt": "messages", "logprobs": "top_logprobs"}


def render_chat(tok: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any] | None,
                continue_final: bool, tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       template_kwargs=kwargs, continue_final_message=continue_final)  # fmt: skip
    except Exception as exc:  # template errors (TemplateError, TypeError, ValueError) are the client's
        raise APIError(400, f"chat template error: {exc}", param="messages") from None


@dataclass
class ChatRun:
    """A chat request on its way: its engine streams and the accumulator its outputs go through."""

    streams: list[OutputStream]
    acc: ChatStream
    start: float
    prompt_tokens: int
    prompt_text: str


async def render_prompt(serving: Serving, req: ChatCompletionRequest) -> tuple[str, list[int], ChatTools]:
    """The request's prompt (chat template, tools included) as text and token ids."""
    req.check()
    tok = serving.need_tokenizer()
    tools = chat_tools(req, tok.chat_template_text(tools=bool(req.tools)), serving.config.tool_call_parser)
    kwargs = serving.template_kwargs(req.reasoning_effort, req.chat_template_kwargs, "reasoning_effort")
    kwargs = {**(kwargs or {}), **({"documents": req.documents} if req.documents else {})}
    text = await asyncio.to_thread(render_chat, tok, tools.messages, req.add_generation_prompt,
                                   kwargs, req.continue_final_message, tools.template_tools)  # fmt: skip
    ids = await asyncio.to_thread(tok.encode, text, req.add_special_tokens)
    return text, serving.truncate(ids, req.truncate_prompt_tokens), tools


def _limit_thinking(serving: Serving, params: SamplingParams, budget: int, think: str | None) -> None:
    """``thinking_token_budget``: the engine writes ``</think>`` once the model has thought ``budget`` tokens."""
    if serving.reasoning is None:
        raise bad_request("thinking_token_budget", "thinking_token_budget: this model does not reason")
    if think == NOT_THINKING:
        return  # the prompt turned thinking off: there is nothing to limit
    tok = serving.need_tokenizer()
    params.thinking_token_budget = budget
    params.thinking_end_token_ids = tok.encode(CLOSE, False)
    params.thinking_start_token_ids = [] if think == OPENED else tok.encode(OPEN, False)
    try:
        params.validate()
    except ParamError as exc:
        raise param_error(exc, RENAME) from None


async def start_chat(serving: Serving, req: ChatCompletionRequest, prefix: str = "chatcmpl",
                     ceiling: bool = False, tenant: str | None = None,
                     rendered: tuple[str, list[int], ChatTools] | None = None, priority: int = 0) -> ChatRun:  # fmt: skip
    """Check, render (tools included), compile the constraint, submit. The Responses and Messages APIs
    come through here too, as the chat requests they translate into. ``ceiling``: their maximum output
    is an upper bound, so it shrinks to the context left (chat refuses what does not fit, as vLLM does).
    ``tenant`` (from the gateway) salts the prefix cache, so no tenant's prompts are cached for another.
    ``rendered``: ``render_prompt``'s answer for ``req``, where the caller has it already; ``priority``: the
    engine's (``Serving.priority``)."""
    text, prompt_ids, tools = rendered or await render_prompt(serving, req)
    think = Reasoning.starts(text) if serving.reasoning is not None else None  # where the output starts
    found = (tools.constraint, "tools") if tools.constraint is not None else req.constraint()
    if found is not None and think not in (None, NOT_THINKING):
        found = (with_thinking(found[0], think), found[1])  # the model thinks, then the constraint holds
    structured = structured_params(found[0], strict_schema(req)) if found is not None else None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_output_tokens()
    room = serving.info.max_model_len - len(prompt_ids)
    if ceiling and max_tokens is not None and 1 <= room < max_tokens:
        max_tokens = room
    params = sampling_params(req, max_tokens, logprobs, RENAME, structured)
    if tools.parser is not None and tools.parser.needs_special_tokens:
        params.skip_special_tokens = False  # the format's markers are special tokens
    if serving.reasoning is not None and serving.reasoning.special_tags and think != NOT_THINKING:
        params.skip_special_tokens = False  # so are the thinking tags, here
    if req.thinking_token_budget is not None:
        _limit_thinking(serving, params, req.thinking_token_budget, think)
    constraint = await serving.compile(params, found[1]) if found is not None else None
    rid = f"{prefix}-{uuid.uuid4().hex}"
    start = time.monotonic()
    streams = serving.submit([prompt_ids], params, serving.salt(tenant, req.cache_salt), rid, RENAME, constraint,
                             priority)  # fmt: skip
    _, every_chunk = req.stream_usage()
    answer_id = f"{prefix}-{req.request_id}" if req.request_id else rid  # the engine's ids stay unique
    acc = ChatStream(answer_id, serving.model_name, params.n, len(prompt_ids), logprobs=params.logprobs is not None,
                     token_text=serving.token_text, tool_parser=tools.parser, usage_every_chunk=every_chunk,
                     prompt_k=params.prompt_logprobs, prompt_ids=prompt_ids if req.return_token_ids else None,
                     label=serving.token_label(req.return_tokens_as_token_ids), echo=req.echo_text(), think=think,
                     include_reasoning=req.include_reasoning)  # fmt: skip
    return ChatRun(streams, acc, start, len(prompt_ids), text)


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, req: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest))
    ) -> Response:
        serving.check_model(req.model)
        run = await start_chat(serving, req, tenant=serving.tenant(request),
                               priority=serving.priority(request, req.priority))  # fmt: skip
        answer = OpenAIAnswer(run.acc, merge_chat_chunks, req.stream_usage()[0])
        return await serving.answer(request, run.streams, answer, stream=req.stream, start=run.start,
                                    headers=prompt_header(run.prompt_tokens))  # fmt: skip
