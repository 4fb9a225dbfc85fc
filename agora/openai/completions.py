"""Text Completions (``/v1/completions``): the request and the response (a stream chunk
has the response's shape, one choice's delta at a time)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import StrictBool, StrictInt

from agora.openai.common import CompletionLogprobs, OpenModel, SamplingFields, Usage, omitted
from agora.openai.errors import bad_request

Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    add_special_tokens: StrictBool = True  # vLLM's: the tokenizer's BOS (and the like) on a text prompt

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix", "suffix (insertion) is not supported")
        if not self.prompts():
            raise bad_request("prompt", "prompt must not be empty")
        if self.echo and self.constraint() is not None:
            raise bad_request("echo", "echo cannot be combined with a structured output constraint")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionChoice(OpenModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = omitted()
    prompt_logprobs: list[dict[str, Any] | None] | None = omitted()  # vLLM's, when asked for
    prompt_token_ids: list[int] | None = omitted()  # vLLM's return_token_ids (a stream: on a choice's first chunk)
    token_ids: list[int] | None = omitted()  # the same: the choice's tokens (a stream: this chunk's)


class Completion(OpenModel):
    """A text completion, and also one chunk of a streamed one."""

    id: str = ""  # defaults: other servers' answers are read leniently (the cache replays them with fresh ones)
    object: Literal["text_completion"] = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice]
    usage: Usage | None = omitted()
