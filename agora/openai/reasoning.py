"""Reasoning models: their thinking (``<think>...</think>``) told apart from their answer, for every API.

::

    the model's chat template ──Reasoning.of()──▶ does the model think; can a request turn it off
    each request's rendered prompt ──starts()──▶ no thinking this turn / the model may open <think> /
                                                  the prompt opened it (DeepSeek-R1, Qwen3 thinking models)
    each choice's text ──ThinkSplitter──▶ ("thinking", text) and ("text", text) pieces
        chat: delta.reasoning (vLLM's field), the answer through the tool parser
        Responses: reasoning items; Messages: thinking blocks

The tags are the format of Qwen3, QwQ, the DeepSeek-R1 family and their distills (vLLM's ``qwen3`` and
``deepseek_r1`` reasoning parsers). A request's output constraint (response_format, tools) is written
after the thinking: its grammar lets the model think first (``think_format``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agora.config import REASONING_PARSERS as PARSERS
from agora.openai.errors import bad_request

OPEN, CLOSE = "<think>", "</think>"
# OpenAI's reasoning efforts: none and minimal turn a switchable model's thinking off, the others on
EFFORTS_OFF = ("none", "minimal")
EFFORTS_ON = ("low", "medium", "high", "xhigh")

NOT_THINKING, MAY_OPEN, OPENED = "off", "may_open", "opened"


@dataclass(frozen=True)
class Reasoning:
    """How the served model reasons. ``switch``: its template takes ``enable_thinking`` (Qwen3's hybrid
    models), so a request can turn thinking off; ``always``: its prompt opens the thinking (DeepSeek-R1, the
    Qwen3 thinking models), so it cannot be off; neither: the model may think on its own (a template that only
    strips ``<think>`` from past turns, as Qwen3's instruct models' does). ``special_tags``: the tags are special
    tokens, which decoding would drop (the text keeps them for splitting)."""

    switch: bool = False
    always: bool = False
    special_tags: bool = False

    @classmethod
    def of(cls, template: str | None, parser: str = "auto", special_tags: bool = False,
           generation_prompt: str = "") -> Reasoning | None:  # fmt: skip
        """The model's reasoning, or None where it has none: ``auto`` reads the template (it writes or strips
        ``<think>``), a vLLM parser name says the model thinks whatever the template says, ``none`` never.
        ``generation_prompt``: a one-message conversation rendered for a reply (where the prompt leaves off)."""
        if parser not in PARSERS:
            raise ValueError(f"reasoning parser {parser!r} is not one of {', '.join(PARSERS)}")
        if parser == "none" or (parser == "auto" and not (template and OPEN in template and CLOSE in template)):
            return None
        switch = bool(template) and "enable_thinking" in template
        return cls(switch=switch, always=not switch and cls.starts(generation_prompt) == OPENED,
                   special_tags=special_tags)  # fmt: skip

    @staticmethod
    def starts(prompt: str) -> str:
        """Where a request's output starts: the prompt closed an (empty) thinking block (thinking is off this
        turn), opened one (the output is thinking until ``</think>``), or neither (the model may open one)."""
        tail = prompt.rstrip()
        if tail.endswith(CLOSE):
            return NOT_THINKING
        return OPENED if tail.endswith(OPEN) else MAY_OPEN

    def template_kwargs(self, effort: str | None, kwargs: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
        """The template arguments with an OpenAI reasoning ``effort`` applied (``param``: where the request
        gave it). A switchable model's thinking goes off for none / minimal and on for the others; a model
        that always thinks refuses none / minimal, one without a switch that may think refuses the others;
        ``enable_thinking`` given as well must agree."""
        if effort is None:
            return kwargs
        if effort not in EFFORTS_OFF + EFFORTS_ON:
            raise bad_request(param, f"reasoning effort {effort!r} is not one of "
                                     f"{', '.join(EFFORTS_OFF + EFFORTS_ON)}")  # fmt: skip
        on = effort in EFFORTS_ON
        if not self.switch:
            if self.always and not on:
                raise bad_request(param, f"reasoning effort {effort!r}: this model always reasons (its chat "
                                         "template has no switch to turn thinking off)")  # fmt: skip
            if not self.always and on:
                raise bad_request(param, f"reasoning effort {effort!r}: this model's chat template has no switch "
                                         "to turn thinking on")  # fmt: skip
            return kwargs
        given = (kwargs or {}).get("enable_thinking")
        if given is not None and bool(given) != on:
            raise bad_request(param, f"reasoning effort {effort!r} contradicts chat_template_kwargs.enable_thinking "
                                     f"{given!r}")  # fmt: skip
        return {**(kwargs or {}), "enable_thinking": on}


def no_reasoning_effort(effort: str | None, param: str) -> None:
    """A model that does not reason takes effort none (no reasoning is what it does) and refuses the others."""
    if effort not in (None, "none"):
        raise bad_request(param, f"reasoning effort {effort!r} is not supported by this model (it does not reason)")


# what these models write between </think> and the answer; a grammar allows it (or nothing) there
GAP = {"type": "optional", "content": {"type": "const_string", "value": "\n\n"}}


def think_format(fmt: dict[str, Any], starts: str) -> dict[str, Any]:
    """A structural-tag format with the thinking before it: the model thinks freely, then the format holds.
    Where the model may open ``<think>`` itself, it may also answer at once."""
    if starts == NOT_THINKING:
        return fmt
    if starts == OPENED:
        return {"type": "sequence", "elements": [
            {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": CLOSE}, GAP, fmt]}  # fmt: skip
    think = {"type": "tag", "begin": OPEN, "content": {"type": "any_text"}, "end": CLOSE}
    return {"type": "sequence", "elements": [{"type": "optional", "content": {"type": "sequence",
                                                                               "elements": [think, GAP]}}, fmt]}  # fmt: skip


class ThinkSplitter:
    """One choice's text split into thinking (inside ``<think>...</think>``) and the answer, as it streams.

    A tag split across pieces is held back until it is whole (or the text ends). ``starts``: where the
    output starts (``Reasoning.starts``). Once the answer has begun, a later ``<think>`` is answer text. The
    newlines around the thinking are the format's, not the text's (chat templates strip them when they write
    a past turn back): each part's leading newlines and the thinking's trailing ones are dropped."""

    def __init__(self, starts: str) -> None:
        self.thinking = starts == OPENED
        self.may_open = starts == MAY_OPEN
        self.fresh = True  # at the start of a part: its leading newlines go
        self.held = ""
        self.opened = int(self.thinking)  # how many times thinking began (a piece may open and close it)

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """(kind, text) pieces, kind "thinking" or "text"."""
        text, out = self.held + text, []
        self.held = ""
        while text:
            if self.may_open:  # the output's first characters: does it open a thinking block?
                stripped = text.lstrip()
                if not final and len(stripped) < len(OPEN) and OPEN.startswith(stripped):  # blank, or "<thi", so far
                    self.held = text
                    break
                self.may_open = False
                if stripped.startswith(OPEN):
                    self.thinking = True
                    self.opened += 1
                    text = stripped[len(OPEN) :]
                continue
            if self.fresh:
                text = text.lstrip("\n")
                if not text:
                    break
                self.fresh = False
            if not self.thinking:
                out.append(("text", text))
                break
            idx = text.find(CLOSE)
            if idx == -1:
                keep = 0 if final else next((n for n in range(min(len(text), len(CLOSE) - 1), 0, -1)
                                             if CLOSE.startswith(text[-n:])), 0)  # fmt: skip
                body = text[: len(text) - keep]
                trimmed = body.rstrip("\n")  # newlines before </think> are the format's
                if not final:
                    self.held = text[len(trimmed) :]
                if trimmed:
                    out.append(("thinking", trimmed))
                break
            if piece := text[:idx].rstrip("\n"):
                out.append(("thinking", piece))
            text = text[idx + len(CLOSE) :]
            self.thinking, self.fresh = False, True
        return out
