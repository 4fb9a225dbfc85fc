"""GGUF files of the Llama 3, Qwen2, Qwen3 and Phi-3 families, as llama.cpp's converter writes them
(``gguf_convert``), load and decode the greedy tokens transformers decodes on the same weights.

Each tiny model is written with Q8_0 weights, so the CPU kernels and the native layers run it
as they run a downloaded file; the reference is transformers on the Q8_0 round trip of the
same weights. The packaged models cover the ``llama`` (SmolLM2) and ``gemma3`` files.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from agora import LLM
from agora.models.layers import LLAMA3_ROPE_DEFAULTS, _llama3_inv_freq, llama3_scaling_from_factors
from agora.models.loader import inspect_model, load_model
from agora.models.quant import GGUFLinear
from tests.conftest import build_tiny_model, build_tokenizer
from tests.models.gguf_convert import _llama3_rope_factors, _rope, convert, reference_folder
from tests.models.test_parity import engine_greedy, hf_greedy, shared_prefix_prompts

# name -> (HF model_type, config overrides, the architecture the loader should report)
FAMILIES = {
    "llama3-rope-tied": ("llama", {
        "tie_word_embeddings": True, "rope_theta": 10000.0, "head_dim": 32,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }, "LlamaForCausalLM"),
    "qwen2-qkv-bias-tied": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1000000.0}, "Qwen2ForCausalLM"),
    "qwen3-qk-norm": ("qwen3", {"head_dim": 32}, "Qwen3ForCausalLM"),
    "phi3-fused-sliding-window": ("phi3", {"sliding_window": 24}, "Phi3ForCausalLM"),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model_type, overrides, architecture = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    build_tokenizer(hf_dir)
    vocab = len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
    build_tiny_model(hf_dir, vocab, model_type, **overrides)
    gguf = convert(hf_dir, root / f"{request.param}.gguf")
    ref_dir = reference_folder(hf_dir, root / "reference")
    hf = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    # the same turn ends as the file's (<|endoftext|> too): min_tokens holds them all back
    hf.generation_config.eos_token_id = inspect_model(gguf).eos_token_ids
    prompts = shared_prefix_prompts(vocab)
    return gguf, hf_dir, architecture, prompts, hf_greedy(hf, prompts)


def test_a_gguf_of_the_family_matches_transformers(family):
    gguf, _, architecture, prompts, expected = family
    assert inspect_model(gguf).architecture == architecture
    llm = LLM(str(gguf), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=48)
    assert engine_greedy(llm, prompts) == expected
    assert engine_greedy(llm, prompts) == expected  # from the prefix cache
    assert llm.engine.stats().prefix_cache_hits > 0


def test_a_gguf_of_the_family_runs_on_the_native_layers(family):
    gguf, *_ = family
    model = load_model(inspect_model(gguf), torch.float32, torch.device("cpu"))
    from agora import kernels

    if not kernels.available():
        pytest.skip("no CPU kernels on this host")
    assert model.model.native is not None  # every linear reads its Q8_0 blocks: one native call per layer


def test_a_gguf_of_the_family_carries_its_tokenizer_and_turn_ends(family):
    from transformers import AutoTokenizer

    gguf, hf_dir, *_ = family
    files = inspect_model(gguf)
    theirs, ours = AutoTokenizer.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(files.tokenizer_dir))
    # (no digits: transformers splits them one by one for a qwen3 file, as Qwen's own tokenizer does)
    text = "Hello world! Paged attention keeps the KV cache in fixed-size blocks. 🎉 façade"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    # the file's EOS (<|im_end|>) first, then <|endoftext|>, which llama.cpp also stops at
    assert files.eos_token_ids == [
        theirs.convert_tokens_to_ids("<|im_end|>"),
        theirs.convert_tokens_to_ids("<|endoftext|>"),
    ]


def test_the_rope_config_of_a_llama3_gguf(family):
    gguf, hf_dir, architecture, *_ = family
    cfg = json.loads((hf_dir / "config.json").read_text())
    got = inspect_model(gguf).hf_config.get("rope_scaling")
    if architecture != "LlamaForCausalLM":
        assert got is None
        return
    theta, want = _rope(cfg)
    assert got == {k: v for k, v in want.items() if k != "rope_theta"}  # 8, 1, 4 and 64, read back
    head_dim = cfg["head_dim"]
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert torch.allclose(_llama3_inv_freq(inv, got), _llama3_inv_freq(inv, want), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "theta, head_dim, scaling",
    [
        (500000.0, 128, {"factor": 8.0, **LLAMA3_ROPE_DEFAULTS}),  # Llama 3.1 8B
        (500000.0, 64, {"factor": 32.0, **LLAMA3_ROPE_DEFAULTS}),  # Llama 3.2 1B
        (
            500000.0,
            128,
            {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 6.0, "original_max_position_embeddings": 4096},
        ),
        (
            500000.0,
            128,
            {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 8192},
        ),  # (the same scaling as 1, 4, 4096)
    ],
)
def test_llama3_scaling_is_read_back_from_llama_cpp_factors(theta, head_dim, scaling):
    scaling = {"rope_type": "llama3", **scaling}
    factors = torch.from_numpy(_llama3_rope_factors({"rope_theta": theta, "rope_scaling": scaling}, head_dim))
    got = llama3_scaling_from_factors(factors, theta, head_dim)
    assert got is not None and got["factor"] == scaling["factor"]
    if scaling["low_freq_factor"] == 1.0:
        assert got == scaling  # the converter's numbers, exactly
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    want = inv.double() / factors.double()
    assert torch.allclose(_llama3_inv_freq(inv, got).double(), want, rtol=1e-5, atol=0)
    # and the positions the model rotates by differ from the original's by float rounding only
    assert math.isclose(float((_llama3_inv_freq(inv, got) * 8000).max()), float((want * 8000).max()), rel_tol=1e-5)


def test_rope_freqs_that_are_no_llama3_scaling_are_refused():
    assert llama3_scaling_from_factors(torch.ones(32), 500000.0, 64) is None
    with pytest.raises(ValueError, match="not a Llama 3 rope scaling"):
        llama3_scaling_from_factors(torch.linspace(1.0, 3.0, 32).flip(0), 500000.0, 64)
    with pytest.raises(ValueError, match="32 frequencies"):
        llama3_scaling_from_factors(torch.ones(16), 500000.0, 64)


def test_blocks_only_every_step_on_the_kernels_matches_transformers(family):
    """``--gguf-weights blocks``: no fp32 copy of a block layer's weight kept, the embedding's neither, so a
    prefill step past the kernels' row limit (all six prompts in one 512-token step) multiplies with weights
    dequantized for it, and the lm_head runs on the kernel."""
    from agora.models.quant import GGUFEmbedding, GGUFLinear

    gguf, _, _, prompts, expected = family
    llm = LLM(str(gguf), dtype="float32", gguf_weights="blocks", max_num_batched_tokens=512, num_blocks=512)
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.weight.numel() == 0 for m in layers)  # the lm_head too, tied or not
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)  # each step dequantizes its tokens' rows
    assert not any(p.numel() > 4096 for p in model.parameters())  # norms and biases only
    assert sum(len(p) for p in prompts) > max(m.kernel_rows for m in layers)
    assert engine_greedy(llm, prompts) == expected


def test_gguf_weights_auto_keeps_fp32_copies_while_they_fit(family, monkeypatch):
    from agora.models import loader

    gguf, *_ = family
    files = inspect_model(gguf)
    need = files.gguf_fp32_bytes
    assert need == sum(4 * p.numel() for p in load_model(files, torch.float32, torch.device("cpu"),
                                                         cpu_kernels=False).parameters() if p.dim() == 2)  # fmt: skip
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: int(need / loader.FP32_COPIES_SHARE) + 1)
    assert loader.keeps_fp32_copies(files, "auto")
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: int(need / loader.FP32_COPIES_SHARE) - 1)
    assert not loader.keeps_fp32_copies(files, "auto")
    assert loader.keeps_fp32_copies(files, "fp32") and not loader.keeps_fp32_copies(files, "blocks")
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: None)  # unknown: as before
    assert loader.keeps_fp32_copies(files, "auto")


def test_int8_activations_with_fp32_copies_or_the_blocks_only(family):
    """--gguf-activations int8 repacks the blocks for its kernel; prefill stays on exact fp32 GEMMs, on fp32 copies
    of the weights or (``blocks``) on weights dequantized from the int8 tiles: the file's weights either way."""
    from agora import kernels
    from tests.models.test_int8_activations import logits

    gguf, *_ = family
    files = inspect_model(gguf)
    copies = load_model(files, torch.float32, torch.device("cpu"), int8_activations=True, gguf_weights="fp32")
    assert isinstance(copies.model.embed_tokens, torch.nn.Embedding)
    assert copies.lm_head.weight.numel() > 0 or copies.lm_head.packed is not None  # an fp32 GEMM weight (or MKL's)
    only = load_model(files, torch.float32, torch.device("cpu"), int8_activations=True, gguf_weights="blocks")
    plain = load_model(files, torch.float32, torch.device("cpu"), cpu_kernels=False)  # the file's weights in fp32
    checked = 0
    for name, m in only.named_modules():
        if isinstance(m, GGUFLinear) and m.int8 and name in dict(plain.named_modules()):
            assert m.blocks_only
            w = kernels.dequantize(m.blocks, m.qtype, m.in_features, int8=True)
            assert torch.equal(w, plain.get_submodule(name).weight), name
            checked += 1
    assert checked >= 7  # q, k, v, o, gate, up, down of a layer at least
    # 99 tokens in one step: past the kernels' rows, GEMMs on dequantized tiles against fp32 copies (the lm_head of
    # the blocks-only model stays on its kernel, so int8's rounding still tells the two apart a little)
    ids = list(range(3, 200, 2))
    a, b = logits(copies, ids), logits(only, ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_replicas_settle_gguf_weights_auto_together(family, monkeypatch):
    """``agora serve --replicas N``: auto is decided once, for the N engines' copies together."""
    from agora.config import EngineConfig, ModelConfig, ServeConfig
    from agora.models import loader
    from agora.router.replicas import prepare_model, settle_gguf_weights

    gguf, *_ = family
    files = prepare_model(str(gguf))
    need = files.gguf_fp32_bytes
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: int(2 * need / loader.FP32_COPIES_SHARE))

    def settled(replicas: int, mode: str = "auto", activations: str = "float32") -> str:
        model = ModelConfig(model=str(gguf), gguf_weights=mode, gguf_activations=activations)
        serve = ServeConfig(engine=EngineConfig(model=model))
        return settle_gguf_weights(serve, files, replicas).engine.model.gguf_weights

    assert settled(1) == settled(2) == "fp32"
    assert settled(3) == "blocks"  # three engines' copies would pass the share
    assert settled(3, activations="int8") == "blocks"  # int8's long steps dequantize its tiles alike
    assert settled(3, "fp32") == "fp32" and settled(1, "blocks") == "blocks"  # asked for: kept


def test_agora_export_of_the_gguf_runs_in_transformers(family, tmp_path):
    """``agora export``: the GGUF written as a Hugging Face folder (Llama 3's rope_freqs back as its config's
    llama3 scaling), which transformers loads and decodes as it decodes the reference."""
    from transformers import AutoModelForCausalLM

    from agora.models.export import export_hf_folder

    gguf, _, _, prompts, expected = family
    out = export_hf_folder(str(gguf), tmp_path / "exported")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = inspect_model(gguf).eos_token_ids
    assert hf_greedy(hf, prompts[:3]) == expected[:3]


def test_phi3_variants_agora_cannot_run_are_refused_by_name(family, tmp_path):
    import numpy as np

    from agora.models.llama import LlamaConfig, Phi3ForCausalLM

    gguf, hf_dir, architecture, *_ = family
    if architecture != "Phi3ForCausalLM":
        pytest.skip("Phi-3 only")
    long_rope = convert(hf_dir, tmp_path / "long.gguf", extra={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="long-context Phi-3"):
        inspect_model(long_rope)
    cfg = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="partial_rotary_factor 0.75"):  # Phi-4-mini
        LlamaConfig.from_hf({**cfg, "partial_rotary_factor": 0.75})
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ValueError, match="longrope"):  # Phi-3.5-mini, Phi-3-mini-128k
        Phi3ForCausalLM(LlamaConfig.from_hf({**cfg, "rope_scaling": longrope}))
