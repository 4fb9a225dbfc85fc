"""Tool-call parsers by name (vLLM's ``--tool-call-parser`` names) and the automatic choice."""

from __future__ import annotations

from agora.openai.tool_parsers.base import CallDelta, Parsed, ToolParser

__all__ = ["CallDelta", "Parsed", "ToolParser"]
