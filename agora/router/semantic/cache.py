"""The semantic cache: answers remembered per (endpoint path, model, tenant, parameters).

Every field but ``stream``, ``stream_options`` and ``user`` is part of the key, so an
answer is never replayed to a request with other ``tools``, ``tool_choice`` or
``response_format``. Answers are kept as agora.openai's response models (tool calls
included) and replayed as JSON or as the chunks of a stream.

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

from agora.openai.chat import ChatCompletion, ChatCompletionChunk
from agora.openai.completions import Completion
from agora.openai.messages import Reply, reply_events, reply_from_sse
from agora.openai.stream import (
    SSE_DONE,
    chat_chunks,
    completion_chunks,
    merge_chat_chunks,
    merge_completion_chunks,
    sse,
    sse_data,
    sse_named,
)
from agora.router.semantic.config import CacheSpec

_VOLATILE = ("stream", "stream_options", "user")  # do not change the answer
Answer = ChatCompletion | Completion | Reply


def api_kind(path: str) -> str | None:
    """Which cacheable API a path speaks: chat, completion, messages (Anthropic); None for the others
    (the Responses API stores its answers and chains them: replaying one would break the chain)."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/v1/completions"):
        return "completion"
    if path.endswith("/v1/messages"):
        return "messages"
    return None


@dataclass(frozen=True)
class CacheKey:
    exact: str
    scope: str
    text: str | None  # the single user message (semantic matching), or None: exact only
    kind: str  # the API: chat, completion, messages


@dataclass
class CacheEntry:
    answer: ChatCompletion | Completion
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
        """The request's cache key, or None when it must not be cached (sampled, n > 1, logprobs, an answer that
        repeats its own prompt: echo, prompt_logprobs, return_token_ids...)."""
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            return None
        logprobs = body.get("logprobs")  # chat: true; completions: a count, 0 included
        if logprobs is True or (isinstance(logprobs, int) and not isinstance(logprobs, bool)) or \
                body.get("top_logprobs") is not None:  # fmt: skip
            return None  # a similar prompt's answer carries that prompt's logprobs
        if body.get("echo") or body.get("prompt_logprobs") is not None or body.get("return_token_ids"):
            return None  # a similar prompt's answer shows that prompt (its text, its tokens)
        if body.get("request_id") is not None:
            return None  # the answer's id is the client's: a replay would give it another request's
        temperature = body.get("temperature", 1.0)  # OpenAI's default is 1
        if not isinstance(temperature, (int, float)) or (temperature > 0 and not self.spec.include_sampled):
            return None
        kind = api_kind(path)
        if kind is None:
            return None
        chat = kind != "completion"
        stable = {k: v for k, v in body.items() if k not in _VOLATILE}
        exact = _digest([path, tenant, stable])
        text, head = _single_turn_text(body, chat)
        rest = {k: v for k, v in stable.items() if k not in ("messages", "prompt")}
        scope = _digest([path, tenant, rest, head])
        return CacheKey(exact, scope, text, kind)

    def lookup(self, key: CacheKey, embedding: np.ndarray | None) -> tuple[Answer, str] | None:
        """(answer, "exact" | "semantic") or None."""
        with self._lock:
            return self._lookup(key, embedding)

    def _lookup(self, key: CacheKey, embedding: np.ndarray | None) -> tuple[Answer, str] | None:
        now = time.monotonic()
        entry = self.entries.get(key.exact)
        if entry is not None:
            if entry.expires > now:
                self.entries.move_to_end(key.exact)
                return entry.answer, "exact"
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
        return self.entries[best_key].answer, "semantic"

    def store(self, key: CacheKey, answer: Answer, embedding: np.ndarray | None) -> None:
        entry = CacheEntry(answer, key.scope, embedding, time.monotonic() + self.spec.ttl_s)
        with self._lock:
            self.entries[key.exact] = entry
            self.entries.move_to_end(key.exact)
            while len(self.entries) > self.spec.max_entries:
                self.entries.popitem(last=False)


# -- answers: read from upstream bodies, replayed as either ------------------------------------


def answer_from_json(payload: bytes, kind: str) -> Answer | None:
    """A whole upstream answer of the API ``kind``, or None if it is not one."""
    try:
        return {"chat": ChatCompletion, "completion": Completion, "messages": Reply}[kind].model_validate_json(payload)
    except ValueError:
        return None


def answer_from_sse(payload: bytes, kind: str) -> Answer | None:
    """A relayed event stream folded into the whole answer; None unless it ran to its end."""
    try:
        text = payload.decode("utf-8")
        if kind == "messages":
            return reply_from_sse(text)
        chunk_type = ChatCompletionChunk if kind == "chat" else Completion
        chunks, done = [], False
        for data in sse_data(text):
            if data == "[DONE]":
                done = True
            else:
                chunks.append(chunk_type.model_validate_json(data))
        if not done or not chunks:
            return None
        return merge_chat_chunks(chunks) if kind == "chat" else merge_completion_chunks(chunks)
    except (ValueError, KeyError, IndexError, TypeError):  # UnicodeDecodeError and ValidationError are ValueErrors
        return None


def _fresh(answer: Answer) -> Answer:
    if isinstance(answer, Reply):
        return answer.model_copy(update={"id": f"msg_{uuid.uuid4().hex[:24]}"})
    prefix = "chatcmpl" if isinstance(answer, ChatCompletion) else "cmpl"
    return answer.model_copy(update={"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time())})


def replay_json(answer: Answer) -> bytes:
    return _fresh(answer).model_dump_json().encode()


def replay_sse(answer: Answer, include_usage: bool) -> list[bytes]:
    """The answer as the events a streaming server would send (``[DONE]`` last for OpenAI's APIs)."""
    fresh = _fresh(answer)
    if isinstance(fresh, Reply):
        return [sse_named(e).encode() for e in reply_events(fresh)]
    chunks = chat_chunks(fresh, include_usage) if isinstance(fresh, ChatCompletion) else \
        completion_chunks(fresh, include_usage)  # fmt: skip
    return [sse(c).encode() for c in chunks] + [SSE_DONE.encode()]
