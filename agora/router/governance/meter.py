"""Tokens counted from what a response really carried, streamed or not.

The relay hands each answer to a :class:`UsageMeter`: a JSON body whole, an event
stream event by event. Each API reports usage its own way (chat and completions:
``usage`` on the last chunk, which the gateway asks for upstream and hides again from
a client that did not ask; Responses: ``response.completed``; Messages:
``message_start`` and ``message_delta``). A stream the client abandoned never gets
there: its output is the number of content deltas relayed (agora and vLLM send one
per token), its input the endpoint's ``x-agora-prompt-tokens`` header when it sends
one, else the estimate the request was admitted with.
"""

from __future__ import annotations

import json
import time
from typing import Any

_MAX_TEXT = 64 << 10  # completion text kept for an audit with content


def api_of(path: str) -> str:
    for suffix, name in (("/chat/completions", "chat"), ("/completions", "completions"),
                         ("/responses", "responses"), ("/messages", "messages")):  # fmt: skip
        if path.endswith(suffix):
            return name
    return "other"


class UsageMeter:
    def __init__(self, api: str, hide_usage_chunk: bool = False, keep_text: bool = False) -> None:
        self.api, self.hide, self.keep_text = api, hide_usage_chunk, keep_text
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.deltas = 0
        self.first_delta: float | None = None  # perf_counter() when the first piece of output went by
        self.text: list[str] = []
        self._text_len = 0
        self.next_sequence = 0  # a Responses stream's: what an event the gateway adds (an error) is numbered

    # -- a stream ----------------------------------------------------------------------

    def event(self, raw: bytes) -> bool:
        """Read one SSE event (without its blank line); False: do not pass it on."""
        data = _event_data(raw)
        if data is None or data == "[DONE]":
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        api = self.api
        if api in ("chat", "completions"):
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            choices = obj.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict):
                    continue
                piece = choice.get("text") if api == "completions" else None
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    piece = delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content")
                    if delta.get("tool_calls"):
                        self._delta()
                        self._keep(json.dumps(delta["tool_calls"]))
                        continue
                if piece:
                    self._delta()
                    self._keep(piece)
            if self.hide and isinstance(usage, dict) and choices == []:
                return False  # the usage chunk the client did not ask for
            return True
        kind = obj.get("type")
        if api == "responses":
            if type(seq := obj.get("sequence_number")) is int:
                self.next_sequence = seq + 1
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                usage = (obj.get("response") or {}).get("usage")
                if isinstance(usage, dict):
                    self._usage(usage.get("input_tokens"), usage.get("output_tokens"))
            elif isinstance(kind, str) and kind.endswith(".delta"):
                self._delta()
                if isinstance(obj.get("delta"), str):
                    self._keep(obj["delta"])
        elif api == "messages":
            if kind == "message_start":
                usage = (obj.get("message") or {}).get("usage")
                if isinstance(usage, dict):
                    self._usage(_anthropic_input(usage), None)
            elif kind == "message_delta":
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    self._usage(_anthropic_input(usage), usage.get("output_tokens"))
            elif kind == "content_block_delta":
                self._delta()
                delta = obj.get("delta") or {}
                piece = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
                if isinstance(piece, str):
                    self._keep(piece)
        return True

    def _delta(self) -> None:
        if self.first_delta is None:
            self.first_delta = time.perf_counter()
        self.deltas += 1

    # -- a whole body ------------------------------------------------------------------

    def body(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if self.api in ("chat", "completions"):
                self._usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            elif self.api == "messages":
                self._usage(_anthropic_input(usage), usage.get("output_tokens"))
            else:
                self._usage(usage.get("input_tokens"), usage.get("output_tokens"))
        if not self.keep_text:
            return
        if self.api == "chat":
            for c in obj.get("choices") or []:
                msg = c.get("message") or {} if isinstance(c, dict) else {}
                self._keep(msg.get("content") or json.dumps(msg.get("tool_calls") or ""))
        elif self.api == "completions":
            for c in obj.get("choices") or []:
                self._keep(c.get("text", "") if isinstance(c, dict) else "")
        elif self.api == "responses":
            self._keep(json.dumps(obj.get("output") or [], ensure_ascii=False))
        elif self.api == "messages":
            self._keep(json.dumps(obj.get("content") or [], ensure_ascii=False))

    # -- the result --------------------------------------------------------------------

    def result(self, prompt_tokens_header: str | None, estimate_in: int) -> tuple[int, int]:
        tokens_in = self.tokens_in
        if tokens_in is None and prompt_tokens_header and prompt_tokens_header.isdigit():
            tokens_in = int(prompt_tokens_header)
        if tokens_in is None:
            tokens_in = estimate_in
        tokens_out = self.tokens_out if self.tokens_out is not None else self.deltas
        return tokens_in, tokens_out

    def completion_text(self) -> str:
        return "".join(self.text)[:_MAX_TEXT]

    def _usage(self, tokens_in: Any, tokens_out: Any) -> None:
        if _count(tokens_in):
            self.tokens_in = tokens_in
        if _count(tokens_out):
            self.tokens_out = tokens_out

    def _keep(self, piece: str) -> None:
        if self.keep_text and self._text_len < _MAX_TEXT and isinstance(piece, str):
            self.text.append(piece)
            self._text_len += len(piece)


def _event_data(raw: bytes) -> str | None:
    lines = []
    for line in raw.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            lines.append(line[5:].lstrip(b" "))
    if not lines:
        return None
    try:
        return b"\n".join(lines).decode()
    except UnicodeDecodeError:
        return None


class EventSplitter:
    """Bytes of an event stream in, whole events (each with its blank line) out."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out = []
        while True:
            i, j = self.buf.find(b"\n\n"), self.buf.find(b"\r\n\r\n")
            if i < 0 and j < 0:
                break
            if j >= 0 and (i < 0 or j < i):
                end = j + 4
            else:
                end = i + 2
            out.append(self.buf[:end])
            self.buf = self.buf[end:]
        return out

    def rest(self) -> bytes:
        rest, self.buf = self.buf, b""
        return rest


def _anthropic_input(usage: dict[str, Any]) -> Any:
    """The prompt's tokens from Anthropic's usage, whose ``input_tokens`` leaves out the cached ones (the other
    APIs count a prompt whole: so does the meter, whatever the cache did)."""
    tokens = usage.get("input_tokens")
    if not _count(tokens):
        return tokens
    return tokens + sum(v for k in ("cache_read_input_tokens", "cache_creation_input_tokens")
                        if _count(v := usage.get(k)))  # fmt: skip


def _count(value: Any) -> bool:
    """A token count as JSON carries one: a non-negative integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
