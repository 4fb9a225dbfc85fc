"""What the scheduling plugins see of a request.

The gateway parses the JSON body once and keeps only what picking needs: the
model, the session key and the prompt (as text for chat and text completions, or
as token ids when a client sends them). The body itself is forwarded untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def content_text(content: Any, sep: str = "") -> str:
    """Message content as text: a string, or the text parts of a multi-part content list joined by ``sep``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


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
        session = session_header or (body.get("user") if isinstance(body.get("user"), str) else None)
        info = cls(path=path, model=model if isinstance(model, str) else None,
                   stream=body.get("stream") is True, session=session or None)  # fmt: skip
        if "messages" in body:
            info.prompt_text = chat_prompt_text(body["messages"])
        else:
            prompt = body.get("prompt", body.get("input"))
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of prompts: route by the first
            if isinstance(prompt, str):
                info.prompt_text = prompt
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                info.prompt_tokens = prompt
        return info
