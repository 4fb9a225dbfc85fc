"""vLLM's ``/tokenize`` and ``/detokenize`` request bodies."""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictInt, model_validator

from agora.openai.chat import ChatCompletionRequest, ChatMessage, Tool
from agora.openai.common import StrictModel


class TokenizeRequest(StrictModel):
    """A text prompt, or messages rendered exactly as ``/v1/chat/completions`` renders them (tools, template
    arguments and documents included), so a client counts what the chat request will send."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        chat_only = ("tools", "chat_template_kwargs", "documents")
        if self.prompt is not None and any(getattr(self, k) is not None for k in chat_only):
            raise ValueError(f"{', '.join(chat_only)} go with messages, not a prompt")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt these messages are."""
        return ChatCompletionRequest(
            model=self.model, messages=self.messages or [], tools=self.tools,
            add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message,
            chat_template_kwargs=self.chat_template_kwargs, documents=self.documents,
            add_special_tokens=bool(self.add_special_tokens),
        )  # fmt: skip


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[StrictInt]
