"""Tool-call parsers by name (vLLM's ``--tool-call-parser`` names) and the automatic choice.

The chat template tells which format a model was trained on; a template that knows no tools
gets the hermes format, taught by :meth:`HermesParser.system_prompt`.
"""

from __future__ import annotations

from agora.openai.tool_parsers.base import CallDelta, Parsed, Tool, ToolParser
from agora.openai.tool_parsers.hermes import HermesParser
from agora.openai.tool_parsers.llama3 import Llama3JsonParser
from agora.openai.tool_parsers.mistral import MistralParser
from agora.openai.tool_parsers.pythonic import PythonicParser

PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)
}

__all__ = ["PARSERS", "CallDelta", "Parsed", "Tool", "ToolParser", "choose_parser", "template_knows_tools"]


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (else agora writes the tool prompt)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def choose_parser(template: str | None, name: str | None = None) -> type[ToolParser]:
    """The parser ``name`` names, else the one the chat template's format calls for."""
    if name is not None:
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
        return PARSERS[name]
    t = template or ""
    if not template_knows_tools(t):
        return HermesParser
    if "[TOOL_CALLS]" in t:
        return MistralParser
    if "<tool_call>" in t:
        return HermesParser
    if "[func_name1(" in t or "func_name(" in t:
        return PythonicParser
    if "<|python_tag|>" in t or '"parameters": dictionary' in t:
        return Llama3JsonParser
    return HermesParser
