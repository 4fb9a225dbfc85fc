"""The CUDA path. Skipped cleanly where PyTorch sees no CUDA device (CI has none)."""

from __future__ import annotations

import pytest
import torch

from agora import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.models.test_parity import TINY_VARIANTS, engine_greedy, hf_greedy, shared_prefix_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen3-qk-norm", "gemma3-local-global"])
def test_fp32_greedy_matches_transformers_on_cuda(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, overrides = TINY_VARIANTS[variant]
    path = build_tiny_model(tmp_path, 320, model_type, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = shared_prefix_prompts(320)
    expected = hf_greedy(hf, prompts)
    # TF32 matmuls would change the numbers; the reference ran in true fp32 on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=4, num_blocks=64, max_num_batched_tokens=48)
    assert llm.engine.device.type == "cuda"
    assert engine_greedy(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0  # 64 blocks of 4 cannot hold them all
    assert llm.engine.kv.usage() == 0.0


def test_cuda_defaults_bf16_and_sizes_kv_from_free_memory(tmp_path):
    path = build_tiny_model(tmp_path, 320, "llama")
    llm = LLM(str(path), gpu_memory_utilization=0.5)
    assert llm.engine.device.type == "cuda" and llm.engine.dtype == torch.bfloat16
    free, total = torch.cuda.mem_get_info()
    assert llm.engine.num_blocks > 1000  # gigabytes of KV for a tiny model
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    out = llm.generate([[5, 6, 7, 8]] * 3, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(r.outputs[0].token_ids) == 8 for r in out)
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids  # batching does not change greedy


@pytest.mark.parametrize("variant", ["llama-gqa", "gemma3-local-global"])
def test_speculation_replays_verification_graphs_and_keeps_greedy_tokens(variant, tmp_path):
    from tests.engine.test_spec_decode import NGRAM, SUFFIX, _greedy, _repetitive_prompts, _untimed

    model_type, overrides = TINY_VARIANTS[variant]
    path = build_tiny_model(tmp_path, 320, model_type, **overrides)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    options = {"device": "cuda", "dtype": "float32", "block_size": 4, "num_blocks": 256}
    base = LLM(str(path), speculative_config=None, enforce_eager=True, **options)
    prompts = _repetitive_prompts(base.engine.vocab_size)
    expected = _greedy(base, prompts)
    for spec in (NGRAM, SUFFIX):
        llm = LLM(str(path), speculative_config=spec, **options)
        _untimed(llm)
        assert _greedy(llm, prompts) == expected
        assert llm.engine.stats().spec.num_accepted_tokens > 0
        queries = {q for _, q, _ in llm.engine.runner.graphs.graphs}
        assert 1 in queries and len(queries) > 2  # decode graphs and verification graphs of several sizes
        assert all(g.graph is not None for g in llm.engine.runner.graphs.graphs.values())
