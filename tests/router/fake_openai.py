"""A small fake OpenAI-compatible server for the gateway's tests and benchmarks.

It answers chat and text completions with its own name as the text (so a test
sees which endpoint answered), streams ``--tokens`` chunks ``--delay-ms`` apart,
exports vLLM's load gauges on /metrics, and counts what happened on /stats.
``/v1/responses`` and ``/v1/messages`` answer whole, in their APIs' shapes, and record the body too;
/stats shows the ``x-agora-*`` headers of the last chat or text completion.
``POST /admin/mode`` switches it between ``ok``, ``error500`` (every request fails),
``error500_cut`` (a 500 whose body breaks off: the connection drops mid-body) and ``break``
(streams stop after the first chunk by dropping the connection).
Usage: one prompt token per word, ``--tokens`` completion tokens; a stream ends with a usage
chunk when ``stream_options.include_usage`` asks for one. ``--done-linger-ms`` sends ``data: [DONE]`` and its blank line in two pieces and then holds
the end of the body that long, as a server that closes its response lazily does.

    python tests/router/fake_openai.py --port 9001 --model m1 --name a
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any


class FakeOpenAI:
    def __init__(self, name: str, models: list[str], tokens: int, delay_ms: float, health: bool, metrics: bool,
                 done_linger_ms: float = 0.0, max_model_len: int | None = None) -> None:  # fmt: skip
        self.name, self.models, self.tokens, self.delay = name, models, tokens, delay_ms / 1000
        self.done_linger = done_linger_ms / 1000
        self.card = {"max_model_len": max_model_len} if max_model_len is not None else {}
        self.health, self.with_metrics = health, metrics
        self.mode = "ok"
        self.waiting = 0
        self.running = 0
        self.stats: dict[str, Any] = {"served": 0, "aborted": 0, "failed": 0, "prompts": []}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/health" and method == "GET":
            await _json(send, 200 if self.health else 404, {})
        elif path == "/v1/models":
            await _json(
                send, 200, {"object": "list", "data": [{"id": m, "object": "model", **self.card} for m in self.models]}
            )
        elif path == "/metrics":
            if not self.with_metrics:
                await _json(send, 404, {})
                return
            lines = []
            for m in self.models:
                lines.append(f'vllm:num_requests_running{{model_name="{m}"}} {self.running}.0')
                lines.append(f'vllm:num_requests_waiting{{model_name="{m}"}} {self.waiting}.0')
                lines.append(f'vllm:kv_cache_usage_perc{{model_name="{m}"}} 0.25')
            await _raw(send, 200, ("\n".join(lines) + "\n").encode(), b"text/plain")
        elif path == "/stats":
            await _json(send, 200, {**self.stats, "running": self.running, "mode": self.mode})
        elif path == "/admin/mode" and method == "POST":
            data = json.loads(body)
            self.mode = data.get("mode", self.mode)
            self.waiting = int(data.get("waiting", self.waiting))
            await _json(send, 200, {"mode": self.mode})
        elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            # what the gateway tells its endpoints about the request (tenant, owner, band), last request's
            self.stats["agora_headers"] = {k.decode(): v.decode() for k, v in scope["headers"]
                                           if k.startswith(b"x-agora-")}  # fmt: skip
            await self._complete(json.loads(body), receive, send, chat=path.endswith("chat/completions"))
        elif path in ("/v1/responses", "/v1/messages") and method == "POST":
            await self._agent_api(json.loads(body), send, path)
        else:
            await _json(send, 404, {"error": {"message": "not found"}})

    async def _complete(self, req: dict[str, Any], receive: Any, send: Any, chat: bool) -> None:
        if req.get("model") not in self.models:
            await _json(send, 404, {"error": {"message": f"model {req.get('model')} not here", "type": "not_found"}})
            return
        if self.mode == "error500":
            self.stats["failed"] += 1
            await _json(send, 500, {"error": {"message": "internal error", "type": "internal_error"}})
            return
        if self.mode == "error500_cut":
            self.stats["failed"] += 1
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"200")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b'{"error": {"mess', "more_body": True})
            raise ConnectionAbortedError("fake endpoint drops the connection mid-body")
        self.stats["prompts"].append(req.get("messages", req.get("prompt")))
        self.stats["last_body"] = req
        self.running += 1
        try:
            if req.get("stream"):
                await self._stream(req, receive, send, chat)
            else:
                if self.delay:
                    await asyncio.sleep(self.delay * self.tokens)
                text = self.name
                choice = {"index": 0, "finish_reason": "stop"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                await _json(send, 200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                                        "created": int(time.time()), "model": req["model"], "choices": [choice],
                                        "usage": _usage(req, self.tokens)})  # fmt: skip
                self.stats["served"] += 1
        finally:
            self.running -= 1

    async def _agent_api(self, req: dict[str, Any], send: Any, path: str) -> None:
        """A whole answer in the Responses or the Anthropic Messages shape, its text our name; a Responses stream:
        numbered events, ``--tokens`` deltas ``--delay-ms`` apart, never completed (what a cut stream looks like)."""
        self.stats["last_body"] = req
        self.stats["served"] += 1
        if path == "/v1/responses" and req.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            events = [{"type": "response.created"}, {"type": "response.in_progress"}]
            events += [{"type": "response.output_text.delta", "delta": "."} for _ in range(self.tokens)]
            for seq, event in enumerate(events):
                body = f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': seq})}\n\n"
                await send({"type": "http.response.body", "body": body.encode(), "more_body": True})
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/v1/responses":
            await _json(send, 200, {"id": "resp_x", "object": "response", "created_at": int(time.time()),
                                    "status": "completed", "model": req.get("model"), "output": [
                                        {"type": "message", "id": "msg_x", "role": "assistant", "status": "completed",
                                         "content": [{"type": "output_text", "text": self.name, "annotations": []}]}],
                                    "usage": {"input_tokens": 3, "output_tokens": self.tokens,
                                              "total_tokens": 3 + self.tokens}})  # fmt: skip
        else:
            await _json(send, 200, {"id": "msg_x", "type": "message", "role": "assistant", "model": req.get("model"),
                                    "content": [{"type": "text", "text": self.name}], "stop_reason": "end_turn",
                                    "stop_sequence": None,
                                    "usage": {"input_tokens": 3, "output_tokens": self.tokens}})  # fmt: skip

    async def _stream(self, req: dict[str, Any], receive: Any, send: Any, chat: bool) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            for i in range(self.tokens):
                if self.mode == "break" and i == 1:
                    raise ConnectionAbortedError("fake endpoint breaks the stream")
                piece = self.name if i == 0 else "."
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                finish = "stop" if i == self.tokens - 1 else None
                chunk = {"id": "x", "model": req["model"], "choices": [{"index": 0, **delta, "finish_reason": finish}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                            "more_body": True})  # fmt: skip
                if self.delay:
                    await asyncio.wait({gone}, timeout=self.delay)
                if gone.done():
                    self.stats["aborted"] += 1
                    return
            self.stats["served"] += 1
            if (req.get("stream_options") or {}).get("include_usage"):
                chunk = {"id": "x", "model": req["model"], "choices": [], "usage": _usage(req, self.tokens)}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                            "more_body": True})  # fmt: skip
            if self.done_linger:  # [DONE] and its blank line in two pieces, the body's end later still
                await send({"type": "http.response.body", "body": b"data: [DONE]", "more_body": True})
                await asyncio.wait({gone}, timeout=0.2)
                await send({"type": "http.response.body", "body": b"\n\n", "more_body": True})
                await asyncio.wait({gone}, timeout=self.done_linger)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            gone.cancel()


def _usage(req: dict[str, Any], tokens: int) -> dict[str, int]:
    """Prompt tokens: one per word of the prompt (a fake tokenizer), so tests can predict them."""
    prompt = req.get("messages", req.get("prompt"))
    text = " ".join(str(m.get("content", "")) for m in prompt) if isinstance(prompt, list) else str(prompt or "")
    words = len(text.split())
    return {"prompt_tokens": words, "completion_tokens": tokens, "total_tokens": words + tokens}


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _raw(send: Any, status: int, body: bytes, ctype: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, payload: Any) -> None:
    await _raw(send, status, json.dumps(payload).encode(), b"application/json")


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--name", default="fake")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--no-health", action="store_true", help="answer 404 on /health, like servers without one")
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--done-linger-ms", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=None, help="said in /v1/models, as vLLM does")
    args = p.parse_args()
    app = FakeOpenAI(args.name, args.model, args.tokens, args.delay_ms, not args.no_health, not args.no_metrics,
                     args.done_linger_ms, args.max_model_len)  # fmt: skip
    # A test's end stops it with SIGTERM: an answer still under way (a slow non-streamed one) is cut after a
    # second instead of holding the process until the fixture's 10 s kill.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error", lifespan="off", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
