"""Pythonic calls: the reply is a Python list of calls, ``[get_weather(city="Paris"), search(q="x")]``
(Llama 3.2 and Llama 4 with their pythonic templates). Arguments may be Python or JSON literals."""

from __future__ import annotations

import ast
import json
from typing import Any

from agora.openai.tool_parsers.base import CallDelta, Parsed, Tool, ToolParser, parse_arguments, tools_json

_LITERALS = {"true": True, "false": False, "null": None}


class PythonicParser(ToolParser):
    name = "pythonic"
    trigger = "["
    separator = ", "

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.mode: str | None = None  # "calls" when the reply starts with "[", else "content"

    def feed(self, text: str) -> Parsed:
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head:
                return Parsed()
            self.mode = "calls" if head.startswith("[") else "content"
            if self.mode == "content":
                out, self.buffer = self.buffer, ""
                return Parsed(content=out)
        if self.mode == "content":
            out, self.buffer = self.buffer, ""
            return Parsed(content=out)
        return Parsed()  # a call list is sent whole, once it parses (at the end)

    def finish(self) -> Parsed:
        if self.mode != "calls":
            out, self.buffer = self.buffer, ""
            return Parsed(content=out)
        calls = parse_calls(self.buffer.strip())
        if calls is None:
            return Parsed(content=self.buffer)
        out = Parsed()
        for name, args in calls:
            out.calls.append(CallDelta(self.num_calls, self.new_call_id(), name, json.dumps(args, ensure_ascii=False)))
            self.num_calls += 1
        return out

    @classmethod
    def calls_format(cls, tools: list[Tool], at_least_one: bool, parallel: bool) -> dict[str, Any]:
        inner = cls.separated_calls(tools, at_least_one, parallel)
        return {"type": "sequence", "elements": [{"type": "const_string", "value": "["}, inner,
                                                 {"type": "const_string", "value": "]"}]}  # fmt: skip

    @classmethod
    def triggered_format(cls, tools: list[Tool], parallel: bool) -> dict[str, Any]:
        """Free text, or a list of calls: here ``[`` starts the list (so text outside it cannot use ``[``)."""
        calls = cls.separated_calls(tools, True, parallel)
        listed = {"type": "tag", "begin": "[", "content": calls, "end": "]"}
        return {"type": "triggered_tags", "triggers": ["["], "tags": [listed], "stop_after_first": True}

    @classmethod
    def call_format(cls, tool: Tool) -> dict[str, Any]:
        props = tool.schema.get("properties") or {}
        required = [k for k in props if k in set(tool.schema.get("required") or [])]
        optional = [k for k in props if k not in required]

        def arg(key: str) -> list[dict[str, Any]]:
            return [{"type": "const_string", "value": f"{key}="},
                    {"type": "json_schema", "json_schema": props[key], "max_whitespace_cnt": 1}]  # fmt: skip

        elements: list[dict[str, Any]] = []
        for k, key in enumerate(required):
            elements += ([{"type": "const_string", "value": ", "}] if k else []) + arg(key)
        for key in optional:  # after the required ones; with none required, each carries a trailing comma
            lead = [{"type": "const_string", "value": ", "}] if required else []
            tail = [] if required else [{"type": "const_string", "value": ", "}]
            elements.append({"type": "optional", "content": {"type": "sequence", "elements": lead + arg(key) + tail}})
        content = {"type": "sequence", "elements": elements} if elements else {"type": "const_string", "value": ""}
        return {"type": "tag", "begin": f"{tool.name}(", "content": content, "end": ")"}

    @classmethod
    def system_prompt(cls, tools: list[Tool]) -> str:
        return (
            "You can call these functions:\n" + tools_json(tools) + "\n\nTo call functions, reply with only a "
            "Python list of calls, such as [func_name1(param1=value1, param2=value2), func_name2(param=value)]."
        )

    @classmethod
    def render_calls(cls, calls: list[tuple[str, str]]) -> str:
        parts = []
        for name, arguments in calls:
            args = parse_arguments(arguments)
            items = args.items() if isinstance(args, dict) else []
            kwargs = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in items)
            parts.append(f"{name}({kwargs})")
        return "[" + ", ".join(parts) + "]"

    @classmethod
    def render_result(cls, content: str) -> str:
        return content


def parse_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``[f(a=1), g()]`` -> [("f", {"a": 1}), ("g", {})], or None if the text is not such a list."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List):
        return None
    out = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                return None
            try:
                args[kw.arg] = _literal(kw.value)
            except ValueError:
                return None
        out.append((name, args))
    return out


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _LITERALS:
        return _LITERALS[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True) if k is not None}
    return ast.literal_eval(node)
