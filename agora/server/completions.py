"""``POST /v1/completions``: parse, check, tokenize, submit, answer."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from agora.openai.accumulate import CompletionStream
from agora.openai.completions import CompletionRequest
from agora.openai.errors import bad_request
from agora.openai.stream import merge_completion_chunks
from agora.server.http import json_body
from agora.server.params import sampling_params, strict_schema, structured_params
from agora.server.serving import OpenAIAnswer, Serving, prompt_header

MAX_PROMPTS_PER_REQUEST = 64
MAX_CHOICES_PER_REQUEST = 64


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest = Depends(json_body(CompletionRequest))) -> Response:
        serving.check_model(req.model)
        req.check()
        found = req.constraint()
        structured = structured_params(found[0], strict_schema(req)) if found is not None else None
        prompt_only = req.echo and req.max_tokens == 0  # scoring a text: its echo (and logprobs), nothing after
        params = sampling_params(req, 1 if prompt_only else req.max_tokens, req.logprobs, structured=structured)
        echo_k = req.logprobs if req.echo else None  # the echoed prompt's tokens get their logprobs too
        wanted = [k for k in (echo_k, req.prompt_logprobs) if k is not None]
        if wanted:
            params.prompt_logprobs = max(wanted)
        raw_prompts = req.prompts()
        if len(raw_prompts) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request("prompt", f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request")
        if len(raw_prompts) * params.n > MAX_CHOICES_PER_REQUEST:
            raise bad_request("n", f"prompts x n must be at most {MAX_CHOICES_PER_REQUEST}")
        prompt_ids: list[list[int]] = []
        for p in raw_prompts:
            if isinstance(p, str):
                if not p:
                    raise bad_request("prompt", "prompt must not be empty")
                # Off the event loop: a long prompt takes a while to tokenize.
                prompt_ids.append(await asyncio.to_thread(serving.need_tokenizer().encode, p, req.add_special_tokens))
            else:
                prompt_ids.append(p)
        truncated = [serving.truncate(ids, req.truncate_prompt_tokens) for ids in prompt_ids]
        cut = [len(a) != len(b) for a, b in zip(truncated, prompt_ids, strict=True)]
        prompt_ids = truncated
        constraint = await serving.compile(params, found[1]) if found is not None else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        answer_id = f"cmpl-{req.request_id}" if req.request_id else rid  # the engine's ids stay unique
        start = time.monotonic()
        salt = serving.salt(serving.tenant(request), req.cache_salt)
        priority = serving.priority(request, req.priority)
        streams = serving.submit(prompt_ids, params, salt, rid, constraint=constraint, priority=priority)
        echo_texts = [""] * len(prompt_ids)
        if req.echo:  # the prompt as sent, or as the model saw it when truncated
            echo_texts = [p if isinstance(p, str) and not c else serving.need_tokenizer().decode(ids)
                          for p, ids, c in zip(raw_prompts, prompt_ids, cut, strict=True)]  # fmt: skip
        at_end, every_chunk = req.stream_usage()
        acc = CompletionStream(answer_id, serving.model_name, params.n, sum(len(p) for p in prompt_ids), echo_texts,
                               logprobs=params.logprobs is not None, token_text=serving.token_text,
                               usage_every_chunk=every_chunk,
                               echo_ids=prompt_ids if echo_k is not None else None, echo_k=echo_k,
                               prompt_only=prompt_only, prompt_k=req.prompt_logprobs,
                               prompt_ids=prompt_ids if req.return_token_ids else None,
                               label=serving.token_label(req.return_tokens_as_token_ids))  # fmt: skip
        answer = OpenAIAnswer(acc, merge_completion_chunks, at_end)
        return await serving.answer(request, streams, answer, stream=req.stream, start=start,
                                    headers=prompt_header(sum(len(p) for p in prompt_ids)))  # fmt: skip
