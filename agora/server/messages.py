"""``/v1/messages``: the Anthropic Messages API over the chat path (errors in Anthropic's shape, the
``x-api-key`` header, ``thinking`` where the model's template has a thinking mode)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from agora.engine.engine import RequestOutput
from agora.openai.accumulate import ChatStream
from agora.openai.messages import (
    RENAME,
    CountTokensRequest,
    MessageEvents,
    MessagesRequest,
    Reply,
    ThinkSplitter,
    new_id,
    sse_event,
)
from agora.server.chat import render_prompt, start_chat
from agora.server.responses import renamed
from agora.server.serving import Serving


class MessagesAnswer:
    """Chat chunks -> Anthropic's events; the whole answer is the message they built."""

    def __init__(self, acc: ChatStream, events: MessageEvents) -> None:
        self.acc, self.events = acc, events

    def start(self) -> list[str]:
        self.acc.start()
        return [sse_event(*e) for e in self.events.start()]

    def feed(self, prompt_index: int, out: RequestOutput) -> list[str]:
        return [sse_event(*e) for chunk in self.acc.feed(prompt_index, out) for e in self.events.feed(chunk)]

    def end(self) -> list[str]:
        return [sse_event(*e) for e in self.events.finish(self.acc.usage())]

    def failed(self, message: str) -> list[str]:
        return [sse_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}})]

    def whole(self) -> Any:
        return self.events.reply.model_dump(mode="json")


def _has_thinking_mode(serving: Serving) -> bool:
    template = serving.tokenizer.chat_template_text() if serving.tokenizer is not None else None
    return bool(template) and "enable_thinking" in template and "<think>" in template


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/v1/messages")
    async def create(req: MessagesRequest, request: Request) -> Response:
        serving.check_model(req.model)
        reasoning = _has_thinking_mode(serving)
        with renamed(RENAME):
            run = await start_chat(serving, req.to_chat(reasoning), prefix="msg", ceiling=True)
        thinking = reasoning and req.thinking is not None and req.thinking.type in ("enabled", "adaptive")
        think = ThinkSplitter(run.prompt_text.rstrip().endswith(ThinkSplitter.OPEN)) if thinking else None
        events = MessageEvents(Reply(id=new_id("msg"), model=serving.model_name), run.prompt_tokens, think)
        return await serving.answer(request, run.streams, MessagesAnswer(run.acc, events), stream=req.stream,
                                    start=run.start)  # fmt: skip

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict[str, int]:
        serving.check_model(req.model)
        with renamed(RENAME):
            _, ids, _ = await render_prompt(serving, req.to_chat(_has_thinking_mode(serving)))
        return {"input_tokens": len(ids)}
