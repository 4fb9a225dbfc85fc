"""MKL's packed GEMM (agora.kernels.mkl) against F.linear (sgemm) and the float64 product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agora import kernels
from agora.kernels import mkl

pytestmark = pytest.mark.skipif(not mkl.available(), reason="this PyTorch's MKL exports no packed GEMM")


@pytest.mark.parametrize(("n", "k"), [(3072, 576), (576, 1536), (960, 576), (100, 64), (49152, 576)])
@pytest.mark.parametrize("rows", [16, 17, 97, 112, 175, 600])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_is_sgemm_up_to_summation_order(n: int, k: int, rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(rows, k, generator=g)
    got, sgemm = mkl.linear(x, mkl.pack(w), bias), F.linear(x, w, bias)
    torch.testing.assert_close(got, sgemm)  # fp32 tolerances: at most a last bit here and there
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert (got - exact).abs().max() <= 1.5 * (sgemm - exact).abs().max() + 1e-6


def test_packed_linear_keeps_leading_dims_and_takes_no_rows() -> None:
    w = torch.randn(64, 32)
    packed = mkl.pack(w)
    x = torch.randn(2, 20, 32)
    assert torch.equal(mkl.linear(x, packed), F.linear(x, w))
    assert mkl.linear(torch.empty(0, 32), packed).shape == (0, 64)


def test_a_packed_weight_outlives_its_source() -> None:
    w = torch.randn(256, 64)
    packed, expected = mkl.pack(w), F.linear(torch.ones(32, 64), w)
    w.zero_()  # the packed copy is MKL's own
    del w
    assert torch.equal(mkl.linear(torch.ones(32, 64), packed), expected)


def test_pack_gemm_weights_packs_the_layers_the_model_calls_and_frees_their_fp32_copies() -> None:
    from agora.models.quant import MAX_KERNEL_ROWS_PACKED_GEMM, GGUFLinear, pack_gemm_weights
    from tests.kernels.test_native_layers import quantized_llama

    model = quantized_llama()
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    x = torch.randn(150, 128)  # past every linear's kernel rows: the GEMM path
    with torch.no_grad():
        before = mlp(x), attn.o_proj(x), model.lm_head(x)
        n = pack_gemm_weights(model)
        after = mlp(x), attn.o_proj(x), model.lm_head(x)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    # per layer qkv, o, gate_up, down (the q/k/v and gate/up parts view the fused weights): 4 x 3, no lm_head
    # (this model's lm_head reads no GGUF blocks)
    assert n == 12 and sum(m.packed is not None for m in layers) == 12
    assert all(m.weight.numel() == 0 for m in layers)  # nothing else reads them
    assert all(m.kernel_rows == MAX_KERNEL_ROWS_PACKED_GEMM for m in layers if m.packed is not None)  # sooner GEMMs
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # a part the fused layer replaced (the model never calls it) still reads its blocks
        part = mlp.gate_proj
        torch.testing.assert_close(part(x), kernels.linear(x, part.blocks, part.qtype, part.bias))
    with pytest.raises(RuntimeError, match="packed for MKL"):
        part(x.requires_grad_())  # but no autograd without an fp32 weight


def test_a_tied_lm_head_is_packed_and_keeps_the_embedding_weight() -> None:
    from torch import nn

    from agora.models.quant import GGUFLinear, pack_gemm_weights
    from tests.kernels.test_cpu_kernels import quantized

    blocks, w = quantized(256, 64, "Q8_0")
    model = nn.Module()
    model.embed = nn.Embedding(256, 64)
    model.embed.weight = nn.Parameter(w, requires_grad=False)
    head = nn.Linear(64, 256, bias=False)
    head.weight = model.embed.weight
    model.head = GGUFLinear(head, blocks, "Q8_0")
    x = torch.randn(200, 64)
    with torch.no_grad():
        before = model.head(x)
        assert pack_gemm_weights(model) == 1
        torch.testing.assert_close(model.head(x), before)
    assert model.head.weight is model.embed.weight and model.embed.weight.numel() == 256 * 64


@pytest.mark.parametrize(("n", "k", "rows"), [(49152, 576, 17), (3072, 576, 144), (100, 64, 1), (64, 32, 0)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_keeps_its_products_in_fp32(n: int, k: int, rows: int, with_bias: bool) -> None:
    """An lm_head on a bf16 weight: x rounded to bf16, the products summed and returned in fp32 (within fp32's
    rounding of the float64 sum), where F.linear's bf16 GEMM returns them rounded to bf16."""
    if mkl.linear_bf16(torch.zeros(1, 32), torch.zeros(8, 32, dtype=torch.bfloat16)) is None:
        pytest.skip("this PyTorch's MKL exports no bf16 GEMM")
    g = torch.Generator().manual_seed(n + rows)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(2, rows, k, generator=g)  # leading dims kept
    got = mkl.linear_bf16(x, w, bias)
    assert got is not None and got.shape == (2, rows, n) and got.dtype == torch.float32
    exact = x.bfloat16().double() @ w.double().T + (0 if bias is None else bias.double())
    if rows:
        assert (got - exact).abs().max() <= 1e-5 * max(1.0, exact.abs().max().item())
        rounded = F.linear(x.bfloat16(), w).float() + (0 if bias is None else bias)
        assert (rounded - exact).abs().max() > 10 * (got - exact).abs().max()  # bf16 outputs: far coarser
