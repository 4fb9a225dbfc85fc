"""Loading errors are clear; the packaged-model catalog resolves names."""

from __future__ import annotations

import json

import pytest

from agora.models.catalog import CATALOG, resolve_model
from agora.models.loader import gguf_to_hf_name, inspect_model, load_model
from agora.models.registry import supported_architectures


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "vocab_size": 10}))
    files = inspect_model(tmp_path)
    with pytest.raises(ValueError) as exc:
        load_model(files, dtype=None, device=None)  # type: ignore[arg-type]
    msg = str(exc.value)
    assert "FooForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "MistralForCausalLM"):
        assert arch in msg
    assert set(supported_architectures()) >= {"Qwen2ForCausalLM", "Gemma3ForCausalLM"}


def test_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        inspect_model(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a .gguf file nor"):
        inspect_model(tmp_path / "x.bin")


def test_unknown_model_name_lists_packaged_models():
    with pytest.raises(ValueError) as exc:
        resolve_model("no-such-model-anywhere")
    assert "smollm2-135m-instruct" in str(exc.value) and "gemma3-270m" in str(exc.value)
    assert set(CATALOG) == {"smollm2-135m-instruct", "gemma3-270m"}


def test_gguf_tensor_names_per_architecture():
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.0.post_ffw_norm.weight", "gemma3") == "model.layers.0.post_feedforward_layernorm.weight"
    with pytest.raises(ValueError, match="no known Hugging Face name"):
        gguf_to_hf_name("blk.0.mystery.weight")
