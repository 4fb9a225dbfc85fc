"""``--dtype bfloat16`` on a CPU: bf16 weights for the GEMMs (layers and lm_head), attention products in bf16 on AMX;
steps the GGUF block kernels take keep their exact fp32 math."""

from __future__ import annotations

import pytest
import torch

from agora import LLM, SamplingParams, kernels
from agora.engine.device import Precision, pick_kv_dtype, pick_precision
from agora.models.quant import GGUFLinear, LowPrecisionLinear, attach_gguf_blocks, cast_gemm_weights, gemm

CPU = torch.device("cpu")


def test_bfloat16_on_a_cpu_means_bf16_gemm_weights_and_fp32_activations():
    bf16 = pick_precision("bfloat16", CPU)
    assert bf16 == Precision(torch.float32, torch.bfloat16, bf16_attention=True, kv_dtype=torch.bfloat16)
    assert pick_kv_dtype("auto", bf16) == torch.bfloat16 and pick_kv_dtype("float16", bf16) == torch.float16
    assert pick_kv_dtype("auto", pick_precision("auto", CPU)) == torch.float32  # exact fp32: an fp32 cache
    assert pick_precision("auto", CPU) == Precision(torch.float32)
    assert pick_precision("float16", CPU) == Precision(torch.float16)  # unchanged: the whole model
    assert pick_precision("bfloat16", torch.device("cuda")) == Precision(torch.bfloat16)


def test_gemm_rounds_only_the_product_inputs():
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((70, 64), (32, 64), (32,)))
    got = gemm(x, w.bfloat16(), b)
    assert got.dtype == torch.float32
    # bf16 inputs, fp32 accumulation; the product comes back as a bf16 and the bias is added in
    # fp32, so the error is bf16 rounding of the product (half an ulp, 2^-9 of it; the bound allows
    # 2^-8 for the accumulation order), never relative to the sum: a product that the bias nearly
    # cancels has a large relative error and is still right.
    product = x.bfloat16().float() @ w.bfloat16().float().T
    error = (got - b - product).abs()
    assert bool((error <= product.abs() * 2.0**-8 + 1e-4).all()), float(error.max())
    assert torch.equal(gemm(x, w, b), torch.nn.functional.linear(x, w, b))


def test_cast_keeps_names_biases_and_lm_head():
    layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64, bias=False))])
    head = torch.nn.Linear(64, 10)
    names = [n for n, _ in layers.named_parameters()]
    assert cast_gemm_weights(layers, torch.bfloat16) == 2
    assert [n for n, _ in layers.named_parameters()] == names
    first = layers[0][0]
    assert isinstance(first, LowPrecisionLinear) and first.weight.dtype == torch.bfloat16
    assert first.bias.dtype == torch.float32 and head.weight.dtype == torch.float32
    assert layers[0](torch.randn(3, 64)).dtype == torch.float32


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
def test_block_layers_keep_fp32_math_for_small_steps_and_bf16_above():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = torch.randn(96, 128) * 0.1
    rows = quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    w = torch.from_numpy(dequantize(rows, GGMLQuantizationType.Q4_1).copy())
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(128, 96, bias=False)])})
    with torch.no_grad():
        model.layers[0].weight.copy_(w)
    cast_gemm_weights(model.layers, torch.bfloat16)
    assert attach_gguf_blocks(model, {"layers.0.weight": ("Q4_1", torch.from_numpy(rows))}, tied=False) == 1
    layer = model.layers[0]
    assert isinstance(layer, GGUFLinear) and layer.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        small, large = torch.randn(8, 128), torch.randn(100, 128)
        assert torch.equal(layer(small), kernels.linear(small, layer.blocks, "Q4_1", None))  # fp32 block math
        torch.testing.assert_close(layer(large), large @ w.T, rtol=2e-2, atol=5e-2)  # bf16 GEMM
        assert not torch.equal(layer(large), large @ w.T)


def test_engine_in_bf16_keeps_fp32_activations_with_a_bf16_cache(tiny_model_dir):
    ref = LLM(str(tiny_model_dir), num_blocks=64)
    llm = LLM(str(tiny_model_dir), num_blocks=64, dtype="bfloat16")
    engine = llm.engine
    assert (engine.dtype, engine.kv_dtype) == (torch.float32, torch.bfloat16)
    assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    # the kernels read it (the decode and prefill attention kernels, and the native layers' cache writes)
    assert engine.runner.attention.paged_kernels == kernels.available()
    layer = engine.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, LowPrecisionLinear) and layer.mlp.down_proj.weight.dtype == torch.bfloat16
    # the lm_head's GEMM too, on its own copy: the embedding it was tied to stays fp32
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    assert engine.model.model.embed_tokens.weight.dtype == torch.float32
    # prefill attention's products in bf16 where the CPU has AMX (the exact default: never)
    assert engine.runner.attention.bf16 == kernels.amx_available()
    assert not ref.engine.runner.attention.bf16
    prompt = list(range(5, 105))  # a 100-token prefill: the GEMMs
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    a = ref.generate([prompt], params)[0].outputs[0]
    b = llm.generate([prompt], params)[0].outputs[0]
    assert len(b.token_ids) == 8
    # The first token's top logprobs stay within bf16's rounding of the fp32 ones.
    top_a, top_b = dict(a.logprobs[0].top), dict(b.logprobs[0].top)
    shared = set(top_a) & set(top_b)
    assert len(shared) >= 3
    for token in shared:
        assert abs(top_a[token] - top_b[token]) < 0.1
    assert top_a != top_b  # the GEMMs did run in bf16
