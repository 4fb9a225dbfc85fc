"""GGUF files in the formats most downloads use (Q4_K_M: Q4_K with Q6_K; Q4_0) decode the greedy tokens
transformers decodes on the same weights, with the 4-bit layers read as QU4 (half QU8's bytes) and the rest as
QU8, on the native layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from agora import LLM, kernels
from agora.models.loader import inspect_model, load_model
from agora.models.quant import GGUFLinear
from tests.conftest import build_tiny_model, build_tokenizer
from tests.models import kquants
from tests.models.gguf_convert import convert, reference_folder
from tests.models.test_parity import engine_greedy, hf_greedy, shared_prefix_prompts

LAYERS = 2


def q4_k_m(name: str) -> str:
    return kquants.q4_k_m(name, LAYERS)  # layer 1's v and down, and the output, in Q6_K


def q4_0(name: str) -> str:
    return "Q4_0"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_blocks_written_here_read_back_as_gguf_py_reads_them(qtype: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 512)).astype(np.float32) * 0.1
    w[3, :256] = 0.0  # a super-block of zeros: scales of 0
    w[5, :32] = np.abs(w[5, :32])  # a sub-block with no negative weight
    back = dequantize(kquants.encode(w, qtype), GGMLQuantizationType[qtype]).reshape(w.shape)
    # every weight near its original (a field or code in the wrong place would move whole sub-blocks): within
    # a code step of its sub-block, the range / 15 (Q4_K), or 2 * max |w| / 62 (Q6_K), plus the scales' rounding
    step = (w.reshape(-1, 32).max(1) - np.minimum(w.reshape(-1, 32).min(1), 0)) / 15 if qtype == "Q4_K" else None
    if step is None:
        assert np.abs(back - w).max() <= 2 * np.abs(w).max() / 62 * 1.5
    else:
        assert (np.abs(back - w).reshape(-1, 32).max(1) <= step * 1.5 + 1e-3).all()
    assert not back[3, :256].any()


@pytest.fixture(scope="module", params=["q4_k_m", "q4_0"])
def kquant_file(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    qtypes = {"q4_k_m": q4_k_m, "q4_0": q4_0}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    build_tokenizer(hf_dir)
    vocab = len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
    # rows a multiple of 256, as the K formats need
    build_tiny_model(hf_dir, vocab, "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                     head_dim=64)  # fmt: skip
    gguf = convert(hf_dir, root / f"{request.param}.gguf", qtypes=qtypes)
    hf = AutoModelForCausalLM.from_pretrained(str(reference_folder(hf_dir, root / "ref", qtypes)), dtype=torch.float32)
    hf.generation_config.eos_token_id = inspect_model(gguf).eos_token_ids
    prompts = shared_prefix_prompts(vocab)
    return request.param, gguf, prompts, hf_greedy(hf.eval(), prompts)


def test_a_kquant_gguf_matches_transformers(kquant_file) -> None:
    _, gguf, prompts, expected = kquant_file
    llm = LLM(str(gguf), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=48)
    assert engine_greedy(llm, prompts) == expected
    blocks_only = LLM(str(gguf), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=48,
                      gguf_weights="blocks")  # fmt: skip
    assert engine_greedy(blocks_only, prompts) == expected  # every step on the kernels, prefill too


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
def test_the_4_bit_layers_are_read_as_qu4_on_the_native_layers(kquant_file) -> None:
    mix, gguf, *_ = kquant_file
    model = load_model(inspect_model(gguf), torch.float32, torch.device("cpu"))
    assert model.model.native is not None
    layers = model.model.layers
    formats = [(layer.self_attn.qkv_proj.qtype, layer.self_attn.o_proj.qtype, layer.mlp.gate_up_proj.qtype,
                layer.mlp.down_proj.qtype) for layer in layers]  # fmt: skip
    if mix == "q4_0":
        assert formats == [("QU4",) * 4] * LAYERS and model.lm_head.qtype == "QU4"
    else:  # layer 1's v in Q6_K: its q/k/v fused as QU8; its down and the output QU8 too
        assert formats == [("QU4",) * 4, ("QU8", "QU4", "QU4", "QU8")] and model.lm_head.qtype == "QU8"
    for layer in model.modules():  # each layer's blocks are half QU8's size where QU4
        if isinstance(layer, GGUFLinear):
            assert layer.blocks.shape[1] == layer.in_features // 32 * kernels.BLOCK_BYTES[layer.qtype]


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
def test_int8_activations_take_every_block_layer_of_the_file(kquant_file) -> None:
    """``--gguf-activations int8`` reads the QU4 and QU8 layers too (Q4_K, Q4_0, Q6_K), fused as with fp32
    activations, on the native layers; the logits move only by x's rounding."""
    from tests.models.test_int8_activations import logits

    _, gguf, prompts, _ = kquant_file
    exact = load_model(inspect_model(gguf), torch.float32, torch.device("cpu"))
    int8 = load_model(inspect_model(gguf), torch.float32, torch.device("cpu"), int8_activations=True)
    assert int8.model.native is not None
    formats = {n: (m.qtype, m.int8) for n, m in int8.named_modules() if isinstance(m, GGUFLinear)}
    assert formats == {n: (m.qtype, True) for n, m in exact.named_modules() if isinstance(m, GGUFLinear)}
    ids = [t for p in prompts for t in p][:48]
    a, b = logits(exact, ids), logits(int8, ids)
    assert not torch.equal(a, b)
    top = a.argmax(-1, keepdim=True)  # the fp32 prediction's logprob under both
    diff = (a.log_softmax(-1).gather(-1, top) - b.log_softmax(-1).gather(-1, top)).abs()
    assert diff.max() < 0.5 and diff.mean() < 0.1, diff.flatten()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
