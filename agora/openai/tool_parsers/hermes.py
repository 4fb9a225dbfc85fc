"""Hermes-style calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, Qwen3,
Hermes, and agora's default for chat templates that know no tools)."""

from __future__ import annotations

import json
from typing import Any

from agora.openai.tool_parsers.base import (
    CallDelta,
    JsonCallStream,
    Parsed,
    Tool,
    ToolParser,
    arguments_format,
    arguments_json,
    held_back,
    tools_json,
)

START, END = "<tool_call>", "</tool_call>"


class MarkedCallParser(ToolParser):
    """Calls between a start and an end marker, anywhere in the text, each a JSON object."""

    start: str = START
    end: str = END
    args_keys: tuple[str, ...] = ("arguments", "parameters")

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.pos = 0  # text before this is handled
        self.call: JsonCallStream | None = None
        self.call_start = 0
        self.space = ""  # whitespace held back: it only reaches content if more content follows it
        self.after_call = False  # the next content follows a call: its leading whitespace is the call's

    def _content(self, text: str) -> str:
        """Content, less the whitespace around calls (held until non-space text follows it)."""
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body) :]
        if self.after_call:
            body = body.lstrip()
        if body:
            self.after_call = False
        return body

    def feed(self, text: str) -> Parsed:
        self.buffer += text
        out = Parsed()
        while True:
            if self.call is None:
                idx = self.buffer.find(self.start, self.pos)
                if idx == -1:
                    upto = len(self.buffer) - held_back(self.buffer[self.pos :], self.start)
                    out.content += self._content(self.buffer[self.pos : upto])
                    self.pos = upto
                    return out
                out.content += self._content(self.buffer[self.pos : idx])
                self.space = ""  # whitespace right before a call is the call's, not content
                self.call = JsonCallStream(self.num_calls, self.new_call_id(), self.args_keys)
                self.call_start = self.pos = idx + len(self.start)
            end = self.buffer.find(self.end, self.call_start)
            region = self.buffer[self.call_start : end if end != -1 else len(self.buffer)]
            out.calls += self.call.feed(region)
            if end == -1:
                return out
            out = out.then(self._close(region))
            self.pos = end + len(self.end)

    def _close(self, region: str) -> Parsed:
        """The end marker arrived: the call is whole (or was never a call: then it is content)."""
        call, self.call = self.call, None
        assert call is not None
        if not call.sent_name:
            return Parsed(content=self._content(self.start + region + self.end))
        self.num_calls += 1
        self.after_call = True
        return Parsed(calls=[] if call.args_done else self._missing_args(call, region))

    @staticmethod
    def _missing_args(call: JsonCallStream, region: str) -> list[CallDelta]:
        """A call written without arguments gets ``{}``."""
        return [CallDelta(call.index, arguments="{}")] if call.sent_args == 0 else []

    def finish(self) -> Parsed:
        if self.call is None:
            rest, self.pos = self.buffer[self.pos :], len(self.buffer)
            content = self._content(rest)
            if not self.num_calls:
                content += self.space  # no calls: the text is all content, its trailing space too
            return Parsed(content=content)
        region = self.buffer[self.call_start :]
        call, self.call = self.call, None
        if not call.sent_name:  # an unfinished marker that never became a call
            return Parsed(content=self._content(self.start + region))
        self.num_calls += 1
        return Parsed(calls=self._missing_args(call, region))


class HermesParser(MarkedCallParser):
    name = "hermes"
    trigger = START

    @classmethod
    def call_format(cls, tool: Tool) -> dict[str, Any]:
        return {"type": "tag", "begin": f'{START}\n{{"name": {json.dumps(tool.name)}, "arguments": ',
                "content": arguments_format(tool), "end": f"}}\n{END}"}  # fmt: skip

    @classmethod
    def system_prompt(cls, tools: list[Tool]) -> str:
        return (
            "You may call one or more functions to help with the user's request. The functions are described "
            f"inside <tools></tools>:\n<tools>\n{tools_json(tools)}\n</tools>\n\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            f"{START}{END} tags, one per call:\n{START}\n"
            '{"name": <function-name>, "arguments": <arguments-json-object>}\n'
            f"{END}\nFunction results come back inside <tool_response></tool_response> tags."
        )

    @classmethod
    def render_calls(cls, calls: list[tuple[str, str]]) -> str:
        parts = []
        for name, arguments in calls:
            args = arguments_json(arguments)
            parts.append(f'{START}\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n{END}')
        return "\n".join(parts)
