"""``POST /v1/chat/completions``: parse, check, render the chat template, submit, answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from agora.openai.accumulate import ChatStream
from agora.openai.chat import ChatCompletionRequest
from agora.openai.errors import APIError
from agora.openai.stream import merge_chat_chunks
from agora.server.params import sampling_params, strict_schema, structured_params
from agora.server.serving import Serving
from agora.server.tools import chat_tools

# Chat has no "prompt": engine errors about it are about the messages; logprobs are top_logprobs here.
RENAME = {"prompt": "messages", "logprobs": "top_logprobs"}


def render_chat(tok: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any] | None,
                continue_final: bool, tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       template_kwargs=kwargs, continue_final_message=continue_final)  # fmt: skip
    except Exception as exc:  # template errors (TemplateError, TypeError, ValueError) are the client's
        raise APIError(400, f"chat template error: {exc}", param="messages") from None


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        serving.check_auth(request)
        serving.check_model(req.model)
        req.check()
        tok = serving.need_tokenizer()
        tools = chat_tools(req, tok.chat_template_text(tools=bool(req.tools)), serving.config.tool_call_parser)
        found = (tools.constraint, "tools") if tools.constraint is not None else req.constraint()
        structured = structured_params(found[0], strict_schema(req)) if found is not None else None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, req.max_output_tokens(), logprobs, RENAME, structured)
        if tools.parser is not None and tools.parser.needs_special_tokens:
            params.skip_special_tokens = False  # the format's markers are special tokens
        text = await asyncio.to_thread(render_chat, tok, tools.messages, req.add_generation_prompt,
                                       req.chat_template_kwargs, req.continue_final_message, tools.template_tools)  # fmt: skip
        prompt_ids = await asyncio.to_thread(tok.encode, text, False)
        constraint = await serving.compile(params, found[1]) if found is not None else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        start = time.monotonic()
        streams = serving.submit([prompt_ids], params, req.cache_salt, rid, RENAME, constraint)
        at_end, every_chunk = req.stream_usage()
        acc = ChatStream(rid, serving.model_name, params.n, len(prompt_ids), logprobs=params.logprobs is not None,
                         token_text=serving.token_text, tool_parser=tools.parser,
                         usage_every_chunk=every_chunk)  # fmt: skip
        return await serving.answer(request, streams, acc, stream=req.stream, include_usage=at_end,
                                    merge=merge_chat_chunks, start=start)  # fmt: skip
