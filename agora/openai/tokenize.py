"""vLLM's ``/tokenize`` and ``/detokenize`` request bodies."""

from __future__ import annotations

from pydantic import StrictBool, StrictInt, model_validator

from agora.openai.chat import ChatMessage
from agora.openai.common import StrictModel


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[StrictInt]
