"""What the scheduling plugins see of a request.

The gateway parses the JSON body once and keeps only what picking needs: the
model, the session key and the prompt (as text for chat and text completions, or
as token ids when a client sends them). The body itself is forwarded untouched.

The four APIs' conversations read alike here (``conversation``): chat ``messages``,
Anthropic's ``system`` + ``messages`` with blocks, the Responses API's ``instructions``
+ ``input`` items. So prefix affinity, sessions and the semantic guards treat them the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def content_text(content: Any, sep: str = "") -> str:
    """Message content as text: a string, or the text of a content list's parts joined by ``sep``
    (text parts, and the text inside Anthropic's tool_result blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, dict) and p.get("type") == "tool_result":
                parts.append(content_text(p.get("content"), sep))
        return sep.join(parts)
    return ""


def conversation(path: str, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's turns as ``{"role", "content"}`` dicts, whatever the API; None for a text completion."""
    if path.endswith("/responses"):
        turns: list[dict[str, Any]] = []
        if isinstance(body.get("instructions"), str):
            turns.append({"role": "system", "content": body["instructions"]})
        items = body.get("input")
        if isinstance(items, str):
            return [*turns, {"role": "user", "content": items}]
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message":
                turns.append({"role": item.get("role", "user"), "content": item.get("content")})
            elif kind == "function_call_output":
                turns.append({"role": "tool", "content": item.get("output")})
            elif kind == "function_call":
                turns.append({"role": "assistant", "content": f"{item.get('name')}({item.get('arguments')})"})
        return turns
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    turns = [m for m in messages if isinstance(m, dict)]
    if path.endswith("/messages") and body.get("system") is not None:  # Anthropic's system prompt
        return [{"role": "system", "content": body["system"]}, *turns]
    return turns


def chat_prompt_text(messages: Any) -> str:
    """A stable text form of a conversation: equal histories give equal leading text.

    Roles are kept so that the same words said by different roles differ. Tool calls
    and other structured fields are left out; only the prefix matters here.
    """
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f"<|{m.get('role', '')}|>{content_text(m.get('content'))}")
    return "".join(parts)


@dataclass(slots=True)
class RequestInfo:
    """One request as the plugins see it."""

    path: str
    model: str | None
    stream: bool = False
    session: str | None = None
    prompt_text: str = ""
    prompt_tokens: list[int] | None = None
    # plugins leave per-request notes here (e.g. the prefix scorer's block hashes)
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, path: str, body: dict[str, Any], session_header: str | None) -> RequestInfo:
        model = body.get("model")
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        named = (body.get("user"), metadata.get("user_id"), body.get("prompt_cache_key"))
        session = session_header or next((s for s in named if isinstance(s, str) and s), None)
        info = cls(path=path, model=model if isinstance(model, str) else None,
                   stream=body.get("stream") is True, session=session or None)  # fmt: skip
        turns = conversation(path, body)
        if turns is not None:
            info.prompt_text = chat_prompt_text(turns)
        else:
            prompt = body.get("prompt", body.get("input"))
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of prompts: route by the first
            if isinstance(prompt, str):
                info.prompt_text = prompt
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                info.prompt_tokens = prompt
        return info
