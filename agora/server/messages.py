"""``/v1/messages``: the Anthropic Messages API over the chat path (errors in Anthropic's shape, the
``x-api-key`` header, ``thinking`` blocks where the model reasons)."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from agora.openai.common import new_id
from agora.openai.messages import RENAME, CountTokensRequest, MessageEvents, MessagesRequest, Reply
from agora.server.chat import render_prompt, start_chat
from agora.server.http import json_body
from agora.server.serving import EventsAnswer, Serving, prompt_header, renamed


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/v1/messages")
    async def create(request: Request, req: MessagesRequest = Depends(json_body(MessagesRequest))) -> Response:
        serving.check_model(req.model)
        with renamed(RENAME):
            run = await start_chat(serving, req.to_chat(serving.reasoning), prefix="msg", ceiling=True,
                                   tenant=serving.tenant(request), priority=serving.priority(request, 0))  # fmt: skip
        events = MessageEvents(Reply(id=new_id("msg", 12), model=serving.model_name), run.prompt_tokens)
        return await serving.answer(request, run.streams, EventsAnswer(run.acc, events), stream=req.stream,
                                    start=run.start, headers=prompt_header(run.prompt_tokens))  # fmt: skip

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest = Depends(json_body(CountTokensRequest))) -> dict[str, int]:
        serving.check_model(req.model)
        with renamed(RENAME):
            _, ids, _ = await render_prompt(serving, req.to_chat(serving.reasoning))
        return {"input_tokens": len(ids)}
