"""Llama 3.x JSON calls: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after
``<|python_tag|>``), several separated by ``;``."""

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
    json_end,
    tools_json,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    trigger = '{"name": '
    separator = "; "
    needs_special_tokens = True  # <|python_tag|> is a special token

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.mode: str | None = None  # None until the reply's first characters decide: "calls" or "content"
        self.pos = 0
        self.call: JsonCallStream | None = None

    def feed(self, text: str) -> Parsed:
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return Parsed()
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :].lstrip()
                if not head:
                    return Parsed()
            self.mode = "calls" if head.startswith("{") else "content"
            self.pos = self.buffer.index(head[0], len(self.buffer) - len(head))
        if self.mode == "content":
            out, self.pos = self.buffer[self.pos :], len(self.buffer)
            return Parsed(content=out)
        return self._calls()

    def _calls(self) -> Parsed:
        out = Parsed()
        while True:
            i = self.pos
            while i < len(self.buffer) and self.buffer[i] in " \t\r\n;":
                i += 1
            if i >= len(self.buffer):
                return out
            if self.call is None:
                if self.buffer[i] != "{":  # text after the calls
                    out.content += self.buffer[i:]
                    self.pos = len(self.buffer)
                    return out
                self.call = JsonCallStream(self.num_calls, self.new_call_id())
                self.pos = i
            region = self.buffer[self.pos :]
            out.calls += self.call.feed(region)
            try:
                end = json_end(region, 0)
            except ValueError:
                end = len(region)
            if end is None:
                return out
            call, self.call = self.call, None
            if call.sent_name:
                self.num_calls += 1
                if call.sent_args == 0:
                    out.calls.append(CallDelta(call.index, arguments="{}"))
            else:  # a JSON object that is not a call
                out.content += region[:end]
            self.pos += end

    def finish(self) -> Parsed:
        if self.mode != "calls":
            return Parsed(content=self.buffer[self.pos :] if self.mode else self.buffer)
        call, self.call = self.call, None
        if call is None:
            return Parsed(content=self.buffer[self.pos :].strip(" \t\r\n;"))
        if not call.sent_name:
            return Parsed(content=self.buffer[self.pos :])
        self.num_calls += 1
        return Parsed()

    @classmethod
    def call_format(cls, tool: Tool) -> dict[str, Any]:
        return {"type": "tag", "begin": f'{{"name": {json.dumps(tool.name)}, "parameters": ',
                "content": arguments_format(tool), "end": "}"}  # fmt: skip

    @classmethod
    def system_prompt(cls, tools: list[Tool]) -> str:
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            "value}. Do not use variables.\n\n" + tools_json(tools)
        )

    @classmethod
    def render_calls(cls, calls: list[tuple[str, str]]) -> str:
        return "; ".join(f'{{"name": {json.dumps(n)}, "parameters": {arguments_json(a)}}}' for n, a in calls)

    @classmethod
    def render_result(cls, content: str) -> str:
        return content
