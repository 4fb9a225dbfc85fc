"""What a chat request's tools mean for the model being served.

::

    request tools + tool_choice ─▶ ToolUse (mode: none / auto / required / named)
        ─▶ parser: --tool-call-parser, else the one the chat template's format calls for
        ─▶ prompt: a template that knows tools gets them (past calls' arguments as objects);
                   one that does not gets the parser's tool prompt in the system message, past
                   calls written in the parser's format, tool results as user turns
        ─▶ constraint (a structural tag): required / named calls, strict tools once a call starts,
                   tools or a response_format answer; once there is a grammar, every call follows its
                   tool's schema
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agora.openai.chat import ChatCompletionRequest, ChatMessage, ToolUse
from agora.openai.common import StructuredOutputs
from agora.openai.errors import bad_request
from agora.openai.reasoning import think_format
from agora.openai.tool_parsers import Tool, ToolParser, choose_parser, template_knows_tools
from agora.openai.tool_parsers.base import parse_arguments


@dataclass
class ChatTools:
    use: ToolUse
    parser: type[ToolParser] | None  # None: no tools in play (nothing is parsed)
    messages: list[dict[str, Any]]  # for the chat template
    template_tools: list[dict[str, Any]] | None  # handed to the template (when it renders tools)
    constraint: StructuredOutputs | None  # the structural tag the calls must follow, if any


def _tools(use: ToolUse) -> list[Tool]:
    return [Tool(t.name, t.schema_(), t.description, bool(t.strict)) for t in use.tools]


def template_message(m: ChatMessage, knows_tools: bool) -> dict[str, Any]:
    """A request message as chat templates read it (developer -> system, text parts joined)."""
    msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name:
        msg["name"] = m.name
    if m.tool_calls:
        calls = []
        for tc in m.tool_calls:
            arguments: Any = tc.function.arguments
            if knows_tools:  # templates write the arguments themselves (most with tojson): give them the object
                arguments = parse_arguments(arguments)
            calls.append({"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                                           "arguments": arguments}})  # fmt: skip
        msg["tool_calls"] = calls
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    if m.thinking():
        msg["reasoning_content"] = m.thinking()  # the name reasoning models' templates read
    return msg


def _without_tool_roles(messages: list[ChatMessage], parser: type[ToolParser]) -> list[dict[str, Any]]:
    """History for a template that knows no tools: calls written out, tool results as user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        msg = template_message(m, knows_tools=False)
        if m.tool_calls:
            written = parser.render_calls([(tc.function.name, tc.function.arguments) for tc in m.tool_calls])
            msg = {"role": "assistant", "content": f"{msg['content']}\n{written}".strip()}
        elif m.role == "tool":
            result = parser.render_result(m.text())
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1]["content"] += "\n" + result  # results of parallel calls: one user turn
                continue
            msg = {"role": "user", "content": result, "_results": True}
        out.append(msg)
    for msg in out:
        msg.pop("_results", None)
    return out


def _with_system(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def chat_tools(req: ChatCompletionRequest, template: str | None, parser_name: str | None) -> ChatTools:
    use = req.tool_use()
    knows = template_knows_tools(template)
    parser = choose_parser(template, parser_name) if use.active or not knows else None
    if knows:
        messages = [template_message(m, knows_tools=True) for m in req.messages]
        offered = [t.model_dump(exclude_none=True) for t in req.tools or []] if use.active else None
    else:
        assert parser is not None
        messages = _without_tool_roles(req.messages, parser)
        offered = None
        if use.active:
            messages = _with_system(messages, parser.system_prompt(_tools(use)))
    constraint = _constraint(req, use, parser) if use.active else None
    return ChatTools(use, parser if use.active else None, messages, offered, constraint)


def _constraint(req: ChatCompletionRequest, use: ToolUse, parser: type[ToolParser] | None) -> StructuredOutputs | None:
    assert parser is not None
    tools = _tools(use)
    answer = req.constraint()
    fmt: dict[str, Any] | None = None
    if use.mode == "required":
        fmt = parser.calls_format(tools, at_least_one=True, parallel=use.parallel)
    elif use.mode == "named":
        fmt = parser.calls_format(tools, at_least_one=True, parallel=False)
    else:  # auto: with a strict tool, free text until a call starts, then the call follows its schema
        if not any(t.strict for t in tools) and answer is None:
            return None  # nothing to enforce: calls are read out of free text
        if answer is None:
            fmt = parser.triggered_format(tools, use.parallel)
        else:  # calls, or the answer in the format the request asks for
            fmt = {
                "type": "or",
                "elements": [parser.calls_format(tools, True, use.parallel), _answer_format(answer[0])],
            }
    return StructuredOutputs(structural_tag={"type": "structural_tag", "format": fmt})


def _answer_format(spec: StructuredOutputs) -> dict[str, Any]:
    if spec.json_object:
        return {"type": "json_schema", "json_schema": {"type": "object"}}
    if spec.json_ is not None:
        return {"type": "json_schema", "json_schema": spec.json_}
    if spec.regex is not None:
        return {"type": "regex", "pattern": spec.regex}
    if spec.grammar is not None:
        return {"type": "grammar", "grammar": spec.grammar}
    if spec.choice is not None:
        return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in spec.choice]}
    raise bad_request("structured_outputs", "a structural_tag cannot be combined with tools (it would replace them)")


def with_thinking(spec: StructuredOutputs, starts: str) -> StructuredOutputs:
    """A reasoning model's constraint: its thinking first (free text up to ``</think>``), then ``spec``.
    A structural tag in the old shape (structures and triggers, no format) is left as it is."""
    fmt: Any
    if spec.structural_tag is not None:
        tag = spec.structural_tag
        try:
            tag = json.loads(tag) if isinstance(tag, str) else tag
        except ValueError:
            return spec  # the compiler says what is wrong with it
        fmt = tag.get("format") if isinstance(tag, dict) else None
        if not isinstance(fmt, dict):
            return spec
    else:
        fmt = _answer_format(spec)
    return StructuredOutputs(structural_tag={"type": "structural_tag", "format": think_format(fmt, starts)})
