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


def test_export_roundtrips_through_transformers(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from agora import LLM, SamplingParams
    from agora.cli import main as agora_main

    out = tmp_path / "exported"
    assert agora_main(["export", str(tiny_model_dir), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    exp = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, exp(ids).logits)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(str(tiny_model_dir), num_blocks=32).generate([[5, 17, 42]], params)[0].outputs[0].token_ids
    b = LLM(str(out), num_blocks=32).generate([[5, 17, 42]], params)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.slow
def test_export_of_the_default_gguf_loads_in_transformers(smollm2_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from agora import LLM, SamplingParams
    from agora.models.export import export_hf_folder

    out = export_hf_folder(str(smollm2_gguf), tmp_path / "smol")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = [1, 9690, 198, 2683, 359, 253, 5356]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12)[0, 7:]
    ours = (
        LLM(str(smollm2_gguf), num_blocks=16)
        .generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=12))[0]
        .outputs[0]
    )
    assert ours.token_ids == expected.tolist()
