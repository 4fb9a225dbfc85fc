"""The texts of a request the guards read, each with where it was found, in any of the four APIs.

::

    chat          messages[i] (system / developer -> "system", user -> "user", tool / function -> "tool")
    completions   prompt, prompt[i]                                         -> "user"
    responses     instructions -> "system"; input (a string) -> "user"; input[i] messages by role;
                  input[i] function_call_output (its output)                -> "tool"
    messages      system -> "system"; messages[i] user text -> "user"; messages[i].content[j] tool_result -> "tool"

A segment's ``path`` names its place in the body (``messages[3]``, ``input[2].output``,
``messages[1].content[0]``): the signal reports it, and quarantine replaces the text there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agora.router.request import content_text

_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "tool", "function": "tool",
          "ipython": "tool"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Segment:
    where: str  # "user" | "system" | "tool"
    path: str  # where in the body, e.g. messages[3]
    keys: tuple[Any, ...]  # the same, as keys into the body
    text: str
    call_id: str | None = None  # the tool call a tool result answers


def segments(path: str, body: dict[str, Any]) -> list[Segment]:
    out: list[Segment] = []

    def add(where: str, keys: tuple[Any, ...], content: Any, call_id: Any = None) -> None:
        text = content_text(content, "\n")
        if text.strip():
            out.append(Segment(where, _path(keys), keys, text, call_id if isinstance(call_id, str) else None))

    if path.endswith("/responses"):
        if isinstance(body.get("instructions"), str):
            add("system", ("instructions",), body["instructions"])
        items = body.get("input")
        if isinstance(items, str):
            add("user", ("input",), items)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message" and item.get("role") in _ROLES:
                add(_ROLES[item["role"]], ("input", i, "content"), item.get("content"))
            elif kind == "function_call_output":
                add("tool", ("input", i, "output"), item.get("output"), item.get("call_id"))
        return out
    if path.endswith("/v1/messages"):  # Anthropic's
        system = body.get("system")
        if system is not None:
            add("system", ("system",), system)
        for i, m in enumerate(body.get("messages") if isinstance(body.get("messages"), list) else []):
            if not isinstance(m, dict) or m.get("role") != "user":
                continue
            content = m.get("content")
            if isinstance(content, str):
                add("user", ("messages", i, "content"), content)
                continue
            for j, block in enumerate(content if isinstance(content, list) else []):
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_result":
                    add(
                        "tool", ("messages", i, "content", j, "content"), block.get("content"), block.get("tool_use_id")
                    )
                elif block.get("type") == "text":
                    add("user", ("messages", i, "content", j, "text"), block.get("text"))
        return out
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") in _ROLES:
                add(_ROLES[m["role"]], ("messages", i, "content"), m.get("content"), m.get("tool_call_id"))
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        add("user", ("prompt",), prompt)
    elif isinstance(prompt, list):
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                add("user", ("prompt", i), p)
    return out


def replace(body: dict[str, Any], keys: tuple[Any, ...], text: str) -> None:
    """Put ``text`` where a segment was (in a body that is already a copy)."""
    node: Any = body
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = text


def _path(keys: tuple[Any, ...]) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    # "messages[3].content" reads better as messages[3] for whole-message content
    return out.removesuffix(".content") if keys[-1] == "content" and len(keys) == 3 else out
