"""The semantic cache: answers remembered per (endpoint path, model, tenant, parameters).

Lookup is an exact match on the whole request first, then, for single-turn
requests, embedding similarity of the user's message within the same scope
(same path, model, tenant, system prompt and parameters) above ``similarity``.
Entries expire after ``ttl_s``; the least recently used go beyond ``max_entries``.
A hit answers without a backend, as JSON or replayed as SSE chunks.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from agora.router.semantic.config import CacheSpec

_VOLATILE = ("stream", "stream_options", "user")  # do not change the answer


@dataclass(frozen=True)
class CacheKey:
    exact: str
    scope: str
    text: str | None  # the single user message (semantic matching), or None: exact only
    chat: bool


@dataclass
class CacheEntry:
    completion: dict[str, Any]  # canonical: {"model", "choices": [{"index", "text", "finish_reason"}], "usage"}
    scope: str
    embedding: np.ndarray | None
    expires: float


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _single_turn_text(body: dict[str, Any], chat: bool) -> tuple[str | None, Any]:
    """(the user's text, the rest that must match exactly) for single-turn requests."""
    if not chat:
        prompt = body.get("prompt")
        return (prompt, None) if isinstance(prompt, str) else (None, None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return None, None
    *head, last = messages
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        return None, None
    if any(m.get("role") != "system" for m in head):
        return None, None  # a conversation: its answer depends on more than the last message
    return last["content"], head


class SemanticCache:
    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()  # lookups run in worker threads, stores on the event loop

    def key(self, path: str, body: dict[str, Any], tenant: str) -> CacheKey | None:
        """The request's cache key, or None when it must not be cached (sampled, n > 1, logprobs...)."""
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1 or body.get("logprobs") or body.get("top_logprobs"):
            return None
        temperature = body.get("temperature", 1.0)  # OpenAI's default is 1
        if not isinstance(temperature, (int, float)) or (temperature > 0 and not self.spec.include_sampled):
            return None
        chat = path.endswith("/chat/completions")
        stable = {k: v for k, v in body.items() if k not in _VOLATILE}
        exact = _digest([path, tenant, stable])
        text, head = _single_turn_text(body, chat)
        rest = {k: v for k, v in stable.items() if k not in ("messages", "prompt")}
        scope = _digest([path, tenant, rest, head])
        return CacheKey(exact, scope, text, chat)

    def lookup(self, key: CacheKey, embedding: np.ndarray | None) -> tuple[dict[str, Any], str] | None:
        """(completion, "exact" | "semantic") or None."""
        with self._lock:
            return self._lookup(key, embedding)

    def _lookup(self, key: CacheKey, embedding: np.ndarray | None) -> tuple[dict[str, Any], str] | None:
        now = time.monotonic()
        entry = self.entries.get(key.exact)
        if entry is not None:
            if entry.expires > now:
                self.entries.move_to_end(key.exact)
                return entry.completion, "exact"
            del self.entries[key.exact]
        if embedding is None:
            return None
        best, best_key = self.spec.similarity, None
        for k, e in list(self.entries.items()):
            if e.expires <= now:
                del self.entries[k]
            elif e.scope == key.scope and e.embedding is not None:
                sim = float(e.embedding @ embedding)
                if sim >= best:
                    best, best_key = sim, k
        if best_key is None:
            return None
        self.entries.move_to_end(best_key)
        return self.entries[best_key].completion, "semantic"

    def store(self, key: CacheKey, completion: dict[str, Any], embedding: np.ndarray | None) -> None:
        entry = CacheEntry(completion, key.scope, embedding, time.monotonic() + self.spec.ttl_s)
        with self._lock:
            self.entries[key.exact] = entry
            self.entries.move_to_end(key.exact)
            while len(self.entries) > self.spec.max_entries:
                self.entries.popitem(last=False)


# -- canonical completions: from upstream answers, back to answers ----------------------------


def completion_from_json(payload: bytes, chat: bool) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
        choices = []
        for c in data["choices"]:
            text = c["message"].get("content") if chat else c["text"]
            if not isinstance(text, str) or (chat and c["message"].get("tool_calls")):
                return None
            choices.append({"index": c.get("index", 0), "text": text, "finish_reason": c.get("finish_reason")})
        return {"model": data.get("model"), "choices": choices, "usage": data.get("usage")}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def completion_from_sse(payload: bytes, chat: bool) -> dict[str, Any] | None:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    model, usage, done = None, None, False
    try:
        for line in payload.decode("utf-8").splitlines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            model = chunk.get("model", model)
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                i = c.get("index", 0)
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                texts.setdefault(i, []).append(piece or "")
                if c.get("finish_reason"):
                    reasons[i] = c["finish_reason"]
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not done or not texts:
        return None
    choices = [{"index": i, "text": "".join(t), "finish_reason": reasons.get(i)} for i, t in sorted(texts.items())]
    return {"model": model, "choices": choices, "usage": usage}


def as_json(completion: dict[str, Any], chat: bool) -> bytes:
    created = int(time.time())
    if chat:
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": None, "finish_reason": c["finish_reason"]} for c in completion["choices"]]  # fmt: skip
        obj = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
               "model": completion["model"], "choices": choices}  # fmt: skip
    else:
        choices = [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                   for c in completion["choices"]]  # fmt: skip
        obj = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
               "model": completion["model"], "choices": choices}  # fmt: skip
    if completion.get("usage"):
        obj["usage"] = completion["usage"]
    return json.dumps(obj, ensure_ascii=False).encode()


def as_sse(completion: dict[str, Any], chat: bool) -> list[bytes]:
    """The answer as the chunks a streaming server would send: role, text, finish, [DONE]."""
    created, model = int(time.time()), completion["model"]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    out = []
    for c in completion["choices"]:
        i = c["index"]
        if chat:
            out.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            out.append(chunk([{"index": i, "delta": {"content": c["text"]}, "finish_reason": None}]))
            out.append(chunk([{"index": i, "delta": {}, "finish_reason": c["finish_reason"]}]))
        else:
            out.append(chunk([{"index": i, "text": c["text"], "finish_reason": None}]))
            out.append(chunk([{"index": i, "text": "", "finish_reason": c["finish_reason"]}]))
    out.append(b"data: [DONE]\n\n")
    return out
