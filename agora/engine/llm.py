"""The offline Python API: ``LLM(model).generate(...)`` and ``LLM(model).chat(...)``."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tqdm import tqdm

from agora.config import DEFAULT_MODEL, SPEC_AUTO, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from agora.engine.engine import CompletionOutput, Engine, GenerationResult
from agora.engine.sampling import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Run a model in this process.

    ``LLM()`` loads the default packaged model; keyword arguments set fields of
    ModelConfig, CacheConfig or SchedulerConfig by name (e.g. ``max_model_len``,
    ``num_blocks``, ``max_num_seqs``, ``enable_prefix_caching``), and
    ``speculative_config`` (vLLM's dict, e.g. ``{"method": "ngram", "num_speculative_tokens": 5}``; ``None`` or
    ``"off"``: none; the default ``"auto"``: ``suffix`` on a CPU, none on a GPU).
    """

    def __init__(self, model: str = DEFAULT_MODEL, speculative_config: Any = SPEC_AUTO, **kwargs: Any) -> None:
        parts: dict[type, dict[str, Any]] = {ModelConfig: {"model": model}, CacheConfig: {}, SchedulerConfig: {}}
        for key, value in kwargs.items():
            owner = next((cls for cls in parts if key in {f.name for f in dataclasses.fields(cls)}), None)
            if owner is None:
                raise TypeError(f"LLM() got an unknown option {key!r}")
            parts[owner][key] = value
        config = EngineConfig(
            model=ModelConfig(**parts[ModelConfig]),
            cache=CacheConfig(**parts[CacheConfig]),
            scheduler=SchedulerConfig(**parts[SchedulerConfig]),
            speculative_config=speculative_config,
        )
        self.engine = Engine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: list[int] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids), batched; results in input order. ``priority``: one
        per prompt, lower first (``scheduling_policy="priority"``; vLLM's)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list: list[Prompt] = list(prompts)  # type: ignore[arg-type]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("one priority per prompt")
        results: dict[str, GenerationResult] = {}
        order = []
        for i, (prompt, p) in enumerate(zip(prompt_list, params_list, strict=True)):
            rid = f"llm-{next(self._ids)}"
            ids = self._encode(prompt)
            self.engine.add_request(rid, ids, p, priority=priority[i] if priority is not None else 0)
            results[rid] = GenerationResult(rid, ids, [CompletionOutput(i) for i in range(p.n)])
            order.append(rid)
        remaining = sum(p.n for p in params_list)
        with tqdm(total=remaining, desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    results[out.request_id].absorb(out)
                    if out.finished:
                        bar.update(1)
        return [results[rid] for rid in order]

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        for conv in conversations:
            text = self.engine.tokenizer.apply_chat_template(conv, template_kwargs=chat_template_kwargs)  # type: ignore[arg-type]
            prompts.append(self.engine.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, params, use_tqdm=use_tqdm)
