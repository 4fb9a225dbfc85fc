"""Tokenizer, chat template and incremental detokenization with stop strings.

The tokenizer and the chat template come from transformers (which renders
templates in a sandboxed Jinja environment); streaming detokenization uses the
tokenizers library's ``DecodeStream``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agora.engine.sampling import SamplingParams


def _generic_class(path: Path) -> bool:
    """Whether the folder's tokenizer is transformers' generic fast one, which ``AutoTokenizer`` would only
    look up: a ``tokenizer_class`` of ``TokenizersBackend`` (or the older ``PreTrainedTokenizerFast``), no
    ``auto_map`` and no ``config.json`` whose model type could send it elsewhere (the folders agora converts
    GGUF tokenizers into are such)."""
    if (path / "config.json").exists() or not (path / "tokenizer.json").is_file():
        return False
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
    return isinstance(config, dict) and config.get("tokenizer_class") in generic and "auto_map" not in config


class Tokenizer:
    def __init__(self, path: str | Path, extra_eos_token_ids: list[int] | None = None) -> None:
        path = Path(path)
        if _generic_class(path):
            # The class itself: importing AutoTokenizer builds transformers' map of every model it has, only to
            # name this class (the tokenizer's load 3.6 -> 2.4 s, the default model on 2 cores of a Zen 3)
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            self.hf = TokenizersBackend.from_pretrained(str(path))
        else:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(path))
        backend = getattr(self.hf, "backend_tokenizer", None) or getattr(self.hf, "_tokenizer", None)
        if backend is None:
            raise ValueError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
        self.backend = backend
        eos = set(extra_eos_token_ids or [])
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_template_text(self, tools: bool = False) -> str | None:
        """The chat template's source (of the ``tool_use`` template, if the model has named ones and tools are on)."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            return template.get("tool_use" if tools and "tool_use" in template else "default")
        return template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """The text a single token stands for (as OpenAI's logprobs report it)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )


@dataclass
class TextDelta:
    text: str
    stop_string: str | None  # set when a stop string ended the sequence


class IncrementalDetokenizer:
    """Turns generated tokens into text deltas and finds stop strings.

    Text that could be the beginning of a stop string is held back until it is
    clear either way, so a stop string is never split across streamed chunks and
    never leaks into the output.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all decoded text
        self.emitted = 0  # chars of self.text already returned

    def step(self, token_id: int, finished: bool) -> TextDelta:
        piece = self.stream.step(self.tokenizer.backend, token_id) or ""
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += piece
        if self.stops and piece:
            hit = self._find_stop(search_from)
            if hit is not None:
                start, stop = hit
                end = start + len(stop) if self.include_stop else start
                self.text = self.text[:end]
                return TextDelta(self._take(len(self.text)), stop)
        if finished or not self.stops:
            return TextDelta(self._take(len(self.text)), None)
        return TextDelta(self._take(len(self.text) - self._holdback()), None)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        return best

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self.text[-self.max_stop_len :] if self.max_stop_len else ""
        for n in range(min(len(tail), self.max_stop_len - 1), 0, -1):
            suffix = tail[-n:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return n
        return 0
