"""The streaming tool-call parser interface, and the pieces the formats share.

A parser sees a choice's text delta by delta and splits it into ``content`` and tool
calls. Text that might be the start of a call's markup is held back until it is clear
either way, so markup never leaks into ``content``. Calls leave as fragments: the
first fragment of a call carries its ``id`` and ``name``, later ones pieces of
``arguments`` (the call's arguments as JSON text, as the model wrote them).

Each format also knows how to be *generated*: the xgrammar structural-tag format of
one call (for ``tool_choice: required`` / a named tool / ``strict`` tools), the prompt
that teaches it to a model whose chat template knows no tools, and how to write past
calls and tool results back into such a conversation.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ID_CHARS = string.ascii_letters + string.digits
MAX_ARG_WHITESPACE = 4  # consecutive whitespace inside constrained arguments (no endless newlines)


@dataclass(slots=True)
class CallDelta:
    index: int  # which call of the choice (0, 1, ...)
    id: str | None = None  # set on the call's first fragment
    name: str | None = None  # set on the call's first fragment
    arguments: str = ""


@dataclass(slots=True)
class Parsed:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def then(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls)


@dataclass
class Tool:
    """What a format needs of a tool: its name, description and arguments' JSON schema."""

    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool = False


class ToolParser(ABC):
    """One choice's parser. Subclasses set ``name`` and implement :meth:`feed` and :meth:`finish`."""

    name: ClassVar[str]
    separator: ClassVar[str] = "\n"  # between parallel calls, when generated
    trigger: ClassVar[str]  # the text every call starts with (constrained "auto" waits for it)
    needs_special_tokens: ClassVar[bool] = False  # its markers are special tokens: keep them in the text

    def __init__(self) -> None:
        self.num_calls = 0

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    @classmethod
    def new_call_id(cls) -> str:
        return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))

    @abstractmethod
    def feed(self, text: str) -> Parsed:
        """The next piece of the model's text; returns what is now certain."""

    @abstractmethod
    def finish(self) -> Parsed:
        """The model stopped: flush what was held back."""

    # -- generating the format ---------------------------------------------------------------

    @classmethod
    @abstractmethod
    def call_format(cls, tool: Tool) -> dict[str, Any]:
        """The xgrammar structural-tag format of one call of ``tool``."""

    @classmethod
    def calls_format(cls, tools: list[Tool], at_least_one: bool, parallel: bool) -> dict[str, Any]:
        """One call or more (``parallel``), nothing else: the format of ``required`` and of a named tool."""
        return cls.separated_calls(tools, at_least_one, parallel)

    @classmethod
    def separated_calls(cls, tools: list[Tool], at_least_one: bool, parallel: bool) -> dict[str, Any]:
        """Calls one after the other, ``separator`` between them."""
        return {"type": "tags_with_separator", "tags": [cls.call_format(t) for t in tools], "separator": cls.separator,
                "at_least_one": at_least_one, "stop_after_first": not parallel}  # fmt: skip

    @classmethod
    def triggered_format(cls, tools: list[Tool], parallel: bool) -> dict[str, Any]:
        """Free text until a call starts, then the call as its format says (``auto`` with strict tools)."""
        return {"type": "triggered_tags", "triggers": [cls.trigger], "tags": [cls.call_format(t) for t in tools],
                "stop_after_first": not parallel}  # fmt: skip

    @classmethod
    @abstractmethod
    def system_prompt(cls, tools: list[Tool]) -> str:
        """How to call tools, for a model whose chat template knows none."""

    @classmethod
    @abstractmethod
    def render_calls(cls, calls: list[tuple[str, str]]) -> str:
        """Past calls ``(name, arguments JSON)`` as the model would have written them."""

    @classmethod
    def render_result(cls, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"


def arguments_format(tool: Tool) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": tool.schema, "max_whitespace_cnt": MAX_ARG_WHITESPACE}


def parse_arguments(arguments: str) -> Any:
    """A call's arguments JSON text as a value (the text itself where a client sent something that is not JSON)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def arguments_json(arguments: str) -> str:
    """A call's arguments as JSON text: as given, or as a JSON string where it is not JSON."""
    value = parse_arguments(arguments)
    return arguments if value is not arguments else json.dumps(arguments)


def tools_json(tools: list[Tool]) -> str:
    """The tools as the OpenAI function objects, one JSON line each."""
    lines = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = t.schema
        # compact: agents send dozens of large schemas (Claude Code: 24 tools), and the prompt has to fit
        lines.append(json.dumps({"type": "function", "function": fn}, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines)


def held_back(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def json_end(text: str, i: int) -> int | None:
    """Index just past the JSON value that starts at ``text[i]`` (after whitespace); None if the text
    ends first. Raises ValueError where the text is not JSON."""
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n:
        return None
    c = text[i]
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < n:
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    json.loads(text[i : j + 1])  # ValueError if it is not JSON after all
                    return j + 1
            j += 1
        return None
    if c == '"':
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    j = i
    while j < n and text[j] not in ",}] \t\r\n;":
        j += 1
    if j >= n:
        return None
    json.loads(text[i:j])
    return j


class JsonCallStream:
    """One call written as a JSON object ``{"name": ..., <args key>: {...}}``, read as it streams.

    ``feed(region)`` gets the call's text so far (from its ``{``) and returns the fragments now
    certain: the name once its string is whole, then the arguments' text as it grows (held until
    the name is known, if the model wrote the arguments first)."""

    def __init__(self, index: int, call_id: str, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.index, self.id, self.args_keys = index, call_id, args_keys
        self.name: str | None = None
        self.sent_name = False
        self.sent_args = 0  # characters of the arguments already sent
        self.args_done = False
        self.done = False

    def feed(self, region: str) -> list[CallDelta]:
        out: list[CallDelta] = []
        members = _members(region)
        args: tuple[int, int | None] | None = None
        for key, start, end in members:
            if key == "name" and self.name is None and end is not None:
                try:
                    value = json.loads(region[start:end])
                except ValueError:
                    value = None
                if isinstance(value, str):
                    self.name = value
            elif key in self.args_keys and args is None:
                args = (start, end)
        if self.name is not None and not self.sent_name:
            out.append(CallDelta(self.index, self.id, self.name))
            self.sent_name = True
        if self.sent_name and args is not None:
            start, end = args
            upto = end if end is not None else len(region)
            piece = region[start + self.sent_args : upto]
            if piece:
                out.append(CallDelta(self.index, arguments=piece))
                self.sent_args += len(piece)
            self.args_done = end is not None
        return out


def _members(region: str) -> list[tuple[str, int, int | None]]:
    """(key, value start, value end or None) of the top-level members of the object at the start of ``region``."""
    out: list[tuple[str, int, int | None]] = []
    i = region.find("{")
    if i == -1:
        return out
    i += 1
    n = len(region)
    while i < n:
        while i < n and region[i] in " \t\r\n,":
            i += 1
        if i >= n or region[i] != '"':
            return out
        try:
            kend = json_end(region, i)
        except ValueError:
            return out
        if kend is None:
            return out
        key = json.loads(region[i:kend])
        i = kend
        while i < n and region[i] in " \t\r\n":
            i += 1
        if i >= n or region[i] != ":":
            return out
        i += 1
        while i < n and region[i] in " \t\r\n":
            i += 1
        try:
            vend = json_end(region, i)
        except ValueError:
            return out
        out.append((key, i, vend))
        if vend is None:
            return out
        i = vend
    return out
