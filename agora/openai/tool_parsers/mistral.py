"""Mistral calls: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` objects
(v3 tokenizers), or ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11 and later)."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from agora.openai.tool_parsers.base import (
    CallDelta,
    JsonCallStream,
    Parsed,
    Tool,
    ToolParser,
    held_back,
    json_end,
    parse_arguments,
    tools_json,
)

MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralParser(ToolParser):
    name = "mistral"
    trigger = MARK
    needs_special_tokens = True  # [TOOL_CALLS] is a special token

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.pos = 0
        self.calls_at: int | None = None  # where the text after [TOOL_CALLS] starts
        self.call: JsonCallStream | None = None

    @classmethod
    def new_call_id(cls) -> str:
        """Mistral's templates check that a call id is 9 letters or digits."""
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def feed(self, text: str) -> Parsed:
        self.buffer += text
        out = Parsed()
        if self.calls_at is None:
            idx = self.buffer.find(MARK, self.pos)
            if idx == -1:
                upto = len(self.buffer) - held_back(self.buffer[self.pos :], MARK)
                out.content, self.pos = self.buffer[self.pos : upto], upto
                return out
            out.content = self.buffer[self.pos : idx]
            self.calls_at = self.pos = idx + len(MARK)
        return out.then(self._calls())

    def _calls(self) -> Parsed:
        out = Parsed()
        while True:
            i = self.pos
            while i < len(self.buffer) and self.buffer[i] in " \t\r\n,[]":  # between v3 objects
                i += 1
            rest = self.buffer[i:]
            if not rest:
                return out
            if rest.startswith(MARK):  # v11 writes the marker before every call
                self.pos = i + len(MARK)
                continue
            if rest.startswith("{"):  # v3: an object of the array
                if self.call is None:
                    self.call = JsonCallStream(self.num_calls, self.new_call_id(), ("arguments",))
                    self.pos = i
                region = self.buffer[self.pos :]
                out.calls += self.call.feed(region)
                end = _end(region, 0)
                if end is None:
                    return out
                self._done(out)
                self.pos += end
                continue
            mark = rest.find(ARGS)  # v11: name[ARGS]{...}
            if mark == -1:
                return out
            if self.call is None:
                self.call = JsonCallStream(self.num_calls, self.new_call_id(), ("arguments",))
                self.call.name, self.call.sent_name = rest[:mark].strip(), True
                out.calls.append(CallDelta(self.call.index, self.call.id, self.call.name))
            start = i + mark + len(ARGS)
            end = _end(self.buffer, start)
            piece = self.buffer[start + self.call.sent_args : end if end is not None else len(self.buffer)]
            if piece:
                out.calls.append(CallDelta(self.call.index, arguments=piece))
                self.call.sent_args += len(piece)
            if end is None:
                return out
            self._done(out)
            self.pos = end

    def _done(self, out: Parsed) -> None:
        call, self.call = self.call, None
        assert call is not None
        if call.sent_name:
            self.num_calls += 1
            if call.sent_args == 0:
                out.calls.append(CallDelta(call.index, arguments="{}"))

    def finish(self) -> Parsed:
        if self.calls_at is None:
            rest, self.pos = self.buffer[self.pos :], len(self.buffer)
            return Parsed(content=rest)
        out = Parsed()
        if self.call is not None:
            self._done(out)
        return out

    @staticmethod
    def _call_schema(tool: Tool) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.schema},
                "required": ["name", "arguments"]}  # fmt: skip

    @classmethod
    def call_format(cls, tool: Tool) -> dict[str, Any]:
        return cls._array_format([tool], parallel=False)

    @classmethod
    def _array_format(cls, tools: list[Tool], parallel: bool) -> dict[str, Any]:
        """``[TOOL_CALLS]`` and one JSON array of calls (of one call, unless ``parallel``)."""
        calls: dict[str, Any] = {"type": "array", "items": {"anyOf": [cls._call_schema(t) for t in tools]},
                                 "minItems": 1}  # fmt: skip
        if not parallel:
            calls["maxItems"] = 1
        return {"type": "tag", "begin": MARK, "content": {"type": "json_schema", "json_schema": calls}, "end": ""}

    @classmethod
    def calls_format(cls, tools: list[Tool], at_least_one: bool, parallel: bool) -> dict[str, Any]:
        return cls._array_format(tools, parallel)

    @classmethod
    def triggered_format(cls, tools: list[Tool], parallel: bool) -> dict[str, Any]:
        return {"type": "triggered_tags", "triggers": [MARK], "tags": [cls._array_format(tools, parallel)],
                "stop_after_first": True}  # fmt: skip

    @classmethod
    def system_prompt(cls, tools: list[Tool]) -> str:
        return (
            f"You can call these functions:\n{tools_json(tools)}\n\nTo call functions, reply with {MARK} "
            'followed by a JSON list of calls: [{"name": <function-name>, "arguments": <arguments-json-object>}]'
        )

    @classmethod
    def render_calls(cls, calls: list[tuple[str, str]]) -> str:
        items = [{"name": name, "arguments": parse_arguments(arguments)} for name, arguments in calls]
        return MARK + json.dumps(items, ensure_ascii=False)

    @classmethod
    def render_result(cls, content: str) -> str:
        return f"[TOOL_RESULTS]{content}[/TOOL_RESULTS]"


def _end(text: str, i: int) -> int | None:
    """Where the JSON value at ``i`` ends (None: not yet); a value that is not JSON ends the text."""
    try:
        return json_end(text, i)
    except ValueError:
        return len(text)
