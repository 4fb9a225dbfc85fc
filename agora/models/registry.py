"""Hugging Face architecture name -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class); a module is imported only when its model is used.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("agora.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("agora.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("agora.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("agora.models.llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("agora.models.llama", "Phi3ForCausalLM"),
    "Gemma3ForCausalLM": ("agora.models.gemma3", "Gemma3ForCausalLM"),
}

# GGUF general.architecture -> Hugging Face architecture
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # Llama 2 and 3.x, Mistral, SmolLM2
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5 (and their coder and distilled variants)
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",  # Phi-3 (4k context), Phi-4; read as the Llama (or Mistral) it is once q/k/v are split
    "gemma3": "Gemma3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
