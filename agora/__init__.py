"""Agora: the open LLM inference stack in one package."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agora.engine.llm import LLM
    from agora.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import agora` (and the CLI's --help) does not import torch.
    if name == "LLM":
        from agora.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from agora.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
