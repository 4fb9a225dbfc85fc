"""``--gguf-activations int8``: the GGUF block kernels quantize their inputs (llama.cpp's numerics);
refused with a clear error where nothing would use it."""

from __future__ import annotations

import pytest
import torch

from agora import LLM, kernels
from agora.engine.attention import AttentionMetadata, TorchPagedAttention, build_group
from agora.models.quant import GGUFLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")


def test_refused_where_no_layer_reads_gguf_blocks(tiny_model_dir):
    with pytest.raises(ValueError, match="--gguf-activations int8 needs a GGUF model with block layers"):
        LLM(str(tiny_model_dir), num_blocks=16, gguf_activations="int8")


@pytest.mark.slow
def test_smollm2_with_int8_activations_stays_close_to_fp32(smollm2_gguf):
    ref = LLM(str(smollm2_gguf), num_blocks=64)
    llm = LLM(str(smollm2_gguf), num_blocks=64, gguf_activations="int8")
    layers = [m for m in llm.engine.model.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.int8 for m in layers) and llm.engine.model.model.native is not None
    # One text in one step (under 64 tokens: the block kernels) through both models: int8's rounding
    # moves the logits a little (benchmarks/cpu_decode.py reports top-1 agreement and perplexity).
    ids = llm.tokenizer.encode("The harbour was quiet before dawn. Fishing boats rocked against the pier.")
    a, b = logits(ref.engine.model, ids), logits(llm.engine.model, ids)
    top = a.argmax(-1, keepdim=True)  # fp32's prediction at each position, and its logprob under both
    diff = (a.log_softmax(-1).gather(-1, top) - b.log_softmax(-1).gather(-1, top)).abs()
    assert 0 < diff.max() < 0.5 and diff.mean() < 0.15, diff.flatten()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def logits(model, ids: list[int]) -> torch.Tensor:
    hkv, d = model.kv_shape
    blocks = -(-len(ids) // 16)
    caches = [
        (torch.zeros(blocks + 1, 16, hkv, d), torch.zeros(blocks + 1, 16, hkv, d)) for _ in range(model.num_layers)
    ]
    attention = TorchPagedAttention(caches, model.attention_scale, model.layer_sliding_windows)
    windows = set(model.layer_sliding_windows)
    group = build_group(None, [len(ids)], [0], [list(range(blocks))], 16, windows, torch.device("cpu"), True)
    meta = AttentionMetadata(torch.arange(len(ids)), [group])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), attention.bind(meta)))
