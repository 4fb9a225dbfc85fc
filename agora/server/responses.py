"""``/v1/responses``: the OpenAI Responses API over the chat path, with stored responses.

::

    POST   /v1/responses                  previous_response_id → the stored chain as input items →
                                          to_chat() (truncation auto: fit_context) → start_chat →
                                          ResponseEvents → store (store: true)
    GET    /v1/responses/{id}             the stored response (404 for another key's)
    DELETE /v1/responses/{id}
    GET    /v1/responses/{id}/input_items
    POST   /v1/responses/{id}/cancel      400: only a background response can be cancelled, and none runs here
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from agora.openai.chat import ChatCompletionRequest
from agora.openai.common import new_id
from agora.openai.errors import APIError
from agora.openai.responses import (
    RENAME,
    ResponseEvents,
    ResponsesRequest,
    input_items,
    new_response,
)
from agora.server.chat import render_prompt, start_chat
from agora.server.http import json_body
from agora.server.serving import EventsAnswer, Serving, prompt_header, renamed
from agora.server.store import ResponseStore
from agora.server.tools import ChatTools


def _with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as stored: each with an id (as input_items lists them)."""
    out = []
    for item in items:
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}.get(
            item.get("type", ""), "item"
        )
        out.append({"id": new_id(prefix), **item} if not item.get("id") else item)
    return out


async def fit_context(serving: Serving, req: ResponsesRequest,
                      history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, tuple[str, list[int], ChatTools]]:  # fmt: skip
    """``truncation: auto``: the chat request with the fewest items dropped from the beginning of the
    conversation whose prompt leaves room for output. What is left starts at a user message (templates such as
    Gemma's and Mistral's refuse a conversation that opens with the assistant or a tool); if even the last user
    message on does not fit, the request is what it is and the context check refuses it."""
    limit = serving.info.max_model_len

    async def render(drop: int) -> tuple[ChatCompletionRequest, tuple[str, list[int], ChatTools]]:
        chat = req.to_chat(history, drop)
        return chat, await render_prompt(serving, chat)

    best = await render(0)
    items = history + input_items(req)
    starts = [k for k, item in enumerate(items) if k and item.get("type", "message") == "message"
              and item.get("role") == "user"]  # fmt: skip
    if len(best[1][1]) < limit or not starts:
        return best
    last = await render(starts[-1])
    if len(last[1][1]) >= limit:
        return last
    lo, hi, best = 0, len(starts) - 1, last  # the fewest dropped that fits is one of starts[lo..hi]
    while lo < hi:  # a binary search: fewer renders than turns
        mid = (lo + hi) // 2
        found = await render(starts[mid])
        if len(found[1][1]) < limit:
            hi, best = mid, found
        else:
            lo = mid + 1
    return best


def add_routes(app: FastAPI, serving: Serving, store: ResponseStore) -> None:
    def missing(response_id: str, param: str | None = None) -> APIError:
        return APIError(404, f"No response with id {response_id!r} found.", "not_found_error", param)

    @app.post("/v1/responses")
    async def create(request: Request, req: ResponsesRequest = Depends(json_body(ResponsesRequest))) -> Response:
        serving.check_model(req.model)
        req.check()
        owner = serving.owner(request)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            chain = await asyncio.to_thread(store.chain, req.previous_response_id, owner)
            if chain is None:
                raise missing(req.previous_response_id, "previous_response_id")
            history = chain
        with renamed(RENAME):
            chat, rendered = req.to_chat(history), None
            if req.truncation == "auto":
                chat, rendered = await fit_context(serving, req, history)
            run = await start_chat(serving, chat, prefix="resp", ceiling=True, tenant=serving.tenant(request),
                                   rendered=rendered, priority=serving.priority(request, 0))  # fmt: skip
        events = ResponseEvents(new_response(req, serving.model_name),
                                encrypted="reasoning.encrypted_content" in (req.include or []))  # fmt: skip
        answer = EventsAnswer(run.acc, events)
        own_input = _with_ids(input_items(req))

        async def keep() -> None:
            if req.store and events.response.status in ("completed", "incomplete"):
                await asyncio.to_thread(store.put, events.response.model_dump(mode="json"), own_input, owner)

        # the gateway reads the id from this header: it keeps a chain's turns on the replica holding its prefix
        headers = {"x-agora-response-id": events.response.id, **prompt_header(run.prompt_tokens)}
        return await serving.answer(request, run.streams, answer, stream=req.stream, start=run.start, on_done=keep,
                                    headers=headers)  # fmt: skip

    @app.get("/v1/responses/{response_id}")
    async def get(response_id: str, request: Request, stream: str | None = None) -> JSONResponse:
        found = await asyncio.to_thread(store.get, response_id, serving.owner(request))
        if found is None:
            raise missing(response_id)
        if stream is not None and stream.lower() not in ("false", "0"):
            raise APIError(400, "only a background response's events can be streamed again, and this server runs "
                                "none (background: true is refused); get the response without stream", param="stream")  # fmt: skip
        return JSONResponse(found[0])

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str, request: Request) -> JSONResponse:
        if await asyncio.to_thread(store.get, response_id, serving.owner(request)) is None:
            raise missing(response_id)
        raise APIError(400, f"the response {response_id!r} was not created with background: true, so it cannot be "
                            "cancelled (to stop a response being generated, close its connection)")  # fmt: skip

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> JSONResponse:
        if not await asyncio.to_thread(store.delete, response_id, serving.owner(request)):
            raise missing(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_list(response_id: str, request: Request, order: str = "desc", limit: int = 20,
                         after: str | None = None) -> JSONResponse:  # fmt: skip
        found = await asyncio.to_thread(store.get, response_id, serving.owner(request))
        if found is None:
            raise missing(response_id)
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise APIError(400, "order is asc or desc, limit between 1 and 100", param="order")
        items = found[1] if order == "asc" else list(reversed(found[1]))
        if after is not None:
            ids = [i.get("id") for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})  # fmt: skip
