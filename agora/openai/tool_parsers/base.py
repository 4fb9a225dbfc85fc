"""The streaming tool-call parser interface.

A parser sees a choice's text delta by delta and splits it into ``content`` and tool
calls. Text that might be the start of a call's markup is held back until it is clear
either way, so markup never leaks into ``content``. Calls leave as fragments: the
first fragment of a call carries its ``id`` and ``name``, later ones only pieces of
``arguments`` (the call's arguments as JSON text, exactly as the model wrote them).
"""

from __future__ import annotations

import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ID_CHARS = string.ascii_letters + string.digits


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


class ToolParser(ABC):
    """One choice's parser. Subclasses set ``name`` and implement :meth:`feed` and :meth:`finish`."""

    name: ClassVar[str]

    def __init__(self, tool_names: list[str]) -> None:
        self.tool_names = tool_names
        self.num_calls = 0

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    def new_call_id(self) -> str:
        return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))

    @abstractmethod
    def feed(self, text: str) -> Parsed:
        """The next piece of the model's text; returns what is now certain."""

    @abstractmethod
    def finish(self) -> Parsed:
        """The model stopped: flush what was held back (an unfinished call's markup becomes content)."""

    # -- constrained decoding -------------------------------------------------------------

    @classmethod
    @abstractmethod
    def call_format(cls, name: str, schema: dict[str, Any]) -> dict[str, Any]:
        """The xgrammar structural-tag format of one call of ``name`` (a ``tag``)."""

    separator: ClassVar[str] = "\n"  # between parallel calls
    trigger: ClassVar[str | None] = None  # the text every call starts with (for constrained "auto")
