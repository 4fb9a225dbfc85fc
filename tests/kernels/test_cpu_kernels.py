"""The native CPU kernels against the PyTorch math they replace (exact up to summation order)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize, quantize

from agora import kernels
from agora.engine.attention import TorchPagedAttention, build_group
from agora.models import gguf_repack
from agora.models.quant import (
    MAX_KERNEL_ROWS,
    MAX_KERNEL_ROWS_BF16_GEMM,
    MAX_KERNEL_ROWS_BF16_LM_HEAD,
    MAX_KERNEL_ROWS_BLOCKS_ONLY,
    GGUFLinear,
    attach_gguf_blocks,
    cast_lm_head,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
CPU = torch.device("cpu")


def quantized(n: int, k: int, qtype: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF block rows, their dequantized fp32 weight) for a random [n, k] weight; QU4 and QU8 (the formats the
    loader repacks to) repacked from Q4_1 and Q8_0 blocks (QU8's codes then over 1..255)."""
    source = {"QU4": "Q4_1", "QU8": "Q8_0"}.get(qtype, qtype)
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    t = getattr(gguf.GGMLQuantizationType, source)
    blocks = quantize(w, t)
    w = dequantize(blocks, t).astype(np.float32)
    if source != qtype:
        blocks = gguf_repack.repack(blocks, source, w.reshape(n, -1), to=qtype)
    return torch.from_numpy(blocks), torch.from_numpy(w)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])  # QU8: tests/kernels/test_gguf_repack.py
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 10, 16, 20, 23, 40])
@pytest.mark.parametrize("with_bias", [False, True])
# (N, K): one block of weight rows per thread; many uneven blocks; long rows cut into K chunks
@pytest.mark.parametrize(("n", "k"), [(96, 160), (333, 96), (200, 1600)])
# the tiles planned for a 32 KB L1 (up to 8 rows) and a 48 KB one (up to 16 rows with AVX-512); AVX2: 10 in both
@pytest.mark.parametrize("l1d", [32768, 49152])
def test_linear_matches_fp32_on_dequantized_weights(
    qtype: str, m: int, with_bias: bool, n: int, k: int, l1d: int
) -> None:
    blocks, w = quantized(n, k, qtype, seed=m)
    assert blocks.shape == (n, k // 32 * kernels.BLOCK_BYTES[qtype])
    x = torch.randn(m, k)
    bias = torch.randn(n) if with_bias else None
    kernels.set_l1d_bytes(l1d)
    try:
        got = kernels.linear(x, blocks, qtype, bias)
    finally:
        kernels.set_l1d_bytes(0)
    torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_tile_rows_follow_the_l1_planned_for() -> None:
    lib = kernels.lib()  # what the build has (AGORA_CPU_ISA), not only the host
    wide, avx2 = bool(lib.agora_kernels_avx512()), bool(lib.agora_kernels_avx2())
    narrow = 10 if avx2 and not wide else 8  # AVX2: 10 rows (its 16 registers), whatever the L1
    try:  # AVX-512: 16 rows where L1 holds them, else 8
        kernels.set_l1d_bytes(32768)
        assert kernels.tile_rows() == narrow
        kernels.set_l1d_bytes(49152)
        assert kernels.tile_rows() == (16 if wide else narrow)
    finally:
        kernels.set_l1d_bytes(0)


def int8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x quantized to int8 in blocks of 32 (scale max|x| / 127, round half to even), then exact math."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / amax as a true division: torch's `scalar / tensor` multiplies by a rounded reciprocal.
    q = torch.where(amax > 0, torch.round(xb * (torch.full_like(amax, 127.0) / amax)), torch.zeros_like(xb))
    y = (q * (amax / 127)).view(m, k).double() @ w.double().T
    return (y if bias is None else y + bias.double()).float()


@pytest.mark.parametrize("qtype", kernels.I8_QTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 23, 64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(96, 160), (336, 96), (200, 3200)])
def test_int8_activation_linear_is_exact_on_the_quantized_input(
    qtype: str, m: int, with_bias: bool, n: int, k: int
) -> None:
    blocks, w = quantized(n, k, qtype, seed=m)
    x = torch.randn(m, k) * torch.rand(m, 1) * 4  # rows of different scales
    x[0, :32] = 0  # an all-zero block: scale 0
    bias = torch.randn(n) if with_bias else None
    repacked = kernels.repack_i8(blocks, qtype)
    assert repacked.shape == (n // 8, blocks.shape[1] * 8)  # the same bytes, 8 rows a group
    got = kernels.linear(x, repacked, qtype, bias, int8=True)
    # fp32 summation order; QU8's offsets are ~128 codes of weight, so the code and offset sums cancel more
    torch.testing.assert_close(got, int8_reference(x, w, bias), rtol=1e-5, atol=2e-4 if qtype == "QU8" else 5e-5)
    # ... and close to, not equal to, the fp32 product: x's rounding is the only difference.
    exact = F.linear(x, w, bias)
    assert not torch.equal(got, exact)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("qtype", kernels.I8_QTYPES)
def test_int8_tiles_give_back_the_blocks_they_were_made_from(qtype: str) -> None:
    blocks, w = quantized(24, 96, qtype, seed=5)
    tiles = kernels.repack_i8(blocks, qtype)
    assert not torch.equal(tiles.view(-1), blocks.view(-1))  # rearranged ...
    assert torch.equal(kernels.unrepack_i8(tiles, qtype), blocks)  # ... and nothing lost
    # the weights dequantized from the tiles (a long step's GEMM under --gguf-weights blocks) are the blocks'
    expected = kernels.dequantize(blocks, qtype, 96)
    assert torch.equal(kernels.dequantize(tiles, qtype, 96, int8=True), expected)
    out = torch.full((30, 96), float("nan"))  # into a larger buffer, as the layers' shared scratch is
    assert torch.equal(kernels.dequantize(tiles, qtype, 96, out, int8=True), expected)


def test_int8_activation_qu8_takes_its_extreme_codes() -> None:
    """QU8's codes run over 0..255 (Q8_0's repacked: q + 128): the tiles keep them less 128, as signed bytes, so
    AVX2's maddubs pair sums (u8 x s8 into s16) cannot saturate; 128 * sum(x) is added back in integers."""
    blocks, _ = quantized(8, 64, "QU8")
    blocks.view(8, 2, 48)[:, :, 16:] = torch.tensor([0xFF, 0x00, 0x80, 0x7F] * 8, dtype=torch.uint8)
    w = kernels.dequantize(blocks, "QU8", 64)
    for x in (torch.full((3, 64), -1.0), torch.full((3, 64), 1.0), torch.randn(3, 64)):
        got = kernels.linear(x, kernels.repack_i8(blocks, "QU8"), "QU8", None, int8=True)
        torch.testing.assert_close(got, int8_reference(x, w, None), rtol=1e-5, atol=1e-5)


def test_int8_activation_q8_0_takes_the_most_negative_weight() -> None:
    """-128 is a valid Q8_0 value (llama.cpp's quantizer writes -127..127, a file may hold -128):
    AVX2's maddubs needs |w| unsigned, and 128 * 127 * 2 still fits its 16-bit sums."""
    blocks, _ = quantized(8, 64, "Q8_0")
    blocks[:, 2:34] = torch.tensor([0x80, 0x7F] * 16, dtype=torch.uint8)  # -128, 127, ... in every block
    w = torch.from_numpy(dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0).astype(np.float32))
    x = torch.full((3, 64), -1.0)
    got = kernels.linear(x, kernels.repack_i8(blocks, "Q8_0"), "Q8_0", None, int8=True)
    torch.testing.assert_close(got, int8_reference(x, w, None), rtol=1e-5, atol=1e-5)


def test_int8_activations_skip_layers_without_whole_groups_of_rows() -> None:
    blocks, _ = quantized(12, 64, "Q4_1")
    model = torch.nn.Sequential(torch.nn.Linear(64, 12, bias=False), torch.nn.Linear(64, 16, bias=False))
    wide, _ = quantized(16, 64, "Q4_1")
    assert attach_gguf_blocks(model, {"0.weight": ("Q4_1", blocks), "1.weight": ("Q4_1", wide)}, False, int8=True) == 2
    assert (model[0].int8, model[1].int8) == (False, True)
    assert torch.equal(model[0].blocks, blocks)  # 12 rows: the fp32 block kernel, blocks as the file has them


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_dequantize_gives_the_weights_the_kernel_multiplies_with(qtype: str) -> None:
    blocks, w = quantized(333, 160, qtype, seed=3)
    torch.testing.assert_close(kernels.dequantize(blocks, qtype, 160), w, rtol=1e-6, atol=0)
    x = torch.randn(9, 160)
    torch.testing.assert_close(F.linear(x, kernels.dequantize(blocks, qtype, 160)), kernels.linear(x, blocks, qtype, None),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    out = torch.full((333 * 160 + 7,), float("nan"))
    got = kernels.dequantize(blocks, qtype, 160, out=out)  # into the start of a larger buffer
    assert got.data_ptr() == out.data_ptr() and got.shape == (333, 160)
    torch.testing.assert_close(got, w, rtol=1e-6, atol=0)
    assert torch.isnan(out[333 * 160 :]).all()


def test_a_layer_without_fp32_weights_dequantizes_for_long_steps() -> None:
    from agora.models.quant import drop_fp32_weights

    blocks, w = quantized(64, 128, "Q8_0")
    base = torch.nn.Linear(128, 64)
    with torch.no_grad():
        base.weight.copy_(w)
    model = torch.nn.Sequential(GGUFLinear(base, blocks, "Q8_0"))
    assert drop_fp32_weights(model, {}) == 1 and model[0].weight.numel() == 0
    assert model[0].kernel_rows == MAX_KERNEL_ROWS_BLOCKS_ONLY
    with torch.no_grad():
        for rows in (3, MAX_KERNEL_ROWS_BLOCKS_ONLY, MAX_KERNEL_ROWS_BLOCKS_ONLY + 5, 2 * MAX_KERNEL_ROWS):
            # the kernel, then the GEMM on a dequantized copy
            x = torch.randn(rows, 128)
            torch.testing.assert_close(model(x), F.linear(x, w, base.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no fp32 weight"):
        model(torch.randn(3, 128, requires_grad=True))


def test_linear_keeps_leading_dims() -> None:
    blocks, w = quantized(64, 64, "Q4_1")
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(kernels.linear(x, blocks, "Q4_1", None), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gguf_linear_uses_blocks_for_small_batches_and_fp32_for_large() -> None:
    blocks, w = quantized(64, 128, "Q4_1")
    base = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    layer = GGUFLinear(base, blocks, "Q4_1")
    assert layer.weight is base.weight
    with torch.no_grad():
        blocks.zero_()  # zeroed blocks dequantize to 0: proves which path ran
        assert layer(torch.randn(4, 128)).abs().max() == 0
        assert layer(torch.randn(MAX_KERNEL_ROWS, 128)).abs().max() == 0  # verification steps: still the blocks
        assert layer(torch.randn(MAX_KERNEL_ROWS + 1, 128)).abs().max() > 0
        layer.weight.data = layer.weight.data.bfloat16()  # --dtype bfloat16: past a decode batch its GEMM wins
        assert layer.kernel_rows == MAX_KERNEL_ROWS_BF16_GEMM
        assert layer(torch.randn(MAX_KERNEL_ROWS_BF16_GEMM, 128)).abs().max() == 0
        assert layer(torch.randn(MAX_KERNEL_ROWS_BF16_GEMM + 1, 128)).abs().max() > 0


def test_attach_swaps_linears_and_ties_lm_head_to_embedding_blocks() -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(50, 64)
            self.proj = torch.nn.Linear(64, 64, bias=False)
            self.lm_head = torch.nn.Linear(64, 50, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    model = Tiny()
    q, _ = quantized(64, 64, "Q4_1")
    e, _ = quantized(50, 64, "Q8_0")
    blocks = {"proj.weight": ("Q4_1", q), "model.embed_tokens.weight": ("Q8_0", e)}
    model.model = torch.nn.Module()  # HF naming: the embedding lives under model.
    assert attach_gguf_blocks(model, blocks, tied=True) == 2
    assert isinstance(model.proj, GGUFLinear) and model.proj.qtype == "Q4_1"
    assert isinstance(model.lm_head, GGUFLinear) and model.lm_head.qtype == "Q8_0"
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.is_lm_head and not model.proj.is_lm_head


def test_bf16_lm_head_is_a_copy_with_its_own_row_limit() -> None:
    """--dtype bfloat16: the tied lm_head gets a bf16 weight of its own (the embedding keeps fp32),
    and steps past MAX_KERNEL_ROWS_BF16_LM_HEAD rows take its GEMM, not the Q8_0 blocks."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.embed_tokens = torch.nn.Embedding(64, 64)
            self.lm_head = torch.nn.Linear(64, 64, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight

    model = Tiny()
    e, w = quantized(64, 64, "Q8_0")
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(w)
    assert cast_lm_head(model, torch.bfloat16)
    assert attach_gguf_blocks(model, {"model.embed_tokens.weight": ("Q8_0", e)}, tied=True) == 1
    head = model.lm_head
    assert head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    assert head.kernel_rows == MAX_KERNEL_ROWS_BF16_LM_HEAD < MAX_KERNEL_ROWS_BF16_GEMM
    x = torch.randn(MAX_KERNEL_ROWS_BF16_LM_HEAD + 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(x), F.linear(x, w), rtol=0.02, atol=0.05)  # the bf16 GEMM, close to fp32
        e.zero_()  # zeroed blocks: which path ran
        assert head(x[:MAX_KERNEL_ROWS_BF16_LM_HEAD]).abs().max() == 0
        assert head(x).abs().max() > 0
    assert not cast_lm_head(model, torch.bfloat16)  # no nn.Linear head left to cast


def _paged_case(seed: int, batch: int, heads: int, kv_heads: int, head_dim: int, lens: list[int], block_size: int = 16):
    g = torch.Generator().manual_seed(seed)
    per_req = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_req) + 3
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in per_req:
        tables.append(order[at : at + n])
        at += n
    q = torch.randn(batch, heads, head_dim, generator=g)
    return q, k, v, tables


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128), (4, 1, 24), (6, 3, 8)]
)
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_attention_matches_sdpa_path(
    heads: int, kv_heads: int, head_dim: int, window, batch: int, kv_dtype: torch.dtype
) -> None:
    lens = [1, 7, 8, 9, 100, 203][:batch] if batch > 1 else [77]
    q, k, v, tables = _paged_case(batch * 10 + heads, batch, heads, kv_heads, head_dim, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)  # the SDPA path upcasts the same fp16 values
    starts = [n - 1 for n in lens]
    ref_group = build_group(None, [1] * batch, starts, tables, 16, {window}, CPU)
    reference = TorchPagedAttention([(k, v)], 0.3, [window])
    reference.paged_kernels = False
    expected = reference._group(ref_group, q, k, v, window)
    group = build_group(None, [1] * batch, starts, tables, 16, {window}, CPU, paged_kernels=True)
    assert group.seq_lens is not None and group.seq_lens.tolist() == lens
    got = kernels.paged_decode_attention(q, k, v, group.block_tables, group.seq_lens, window, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("lens", [[1300], [700, 3], [2000, 257, 1], [600]])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_attention_splits_long_keys_across_threads(
    threads: int, lens: list[int], window, kv_dtype: torch.dtype
) -> None:
    """Few requests with long contexts: each request's keys are cut into chunks that are merged
    after (flash-decoding); chunk counts depend on the thread count, so each is tried."""
    batch = len(lens)
    q, k, v, tables = _paged_case(sum(lens), batch, 9, 3, 64, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    starts = [n - 1 for n in lens]
    reference = TorchPagedAttention([(k, v)], 0.125, [window])
    reference.paged_kernels = False
    expected = reference._group(build_group(None, [1] * batch, starts, tables, 16, {window}, CPU), q, k, v, window)
    group = build_group(None, [1] * batch, starts, tables, 16, {window}, CPU, paged_kernels=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.paged_decode_attention(q, k, v, group.block_tables, group.seq_lens, window, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 40), (8, 2, 128), (4, 1, 24), (2, 1, 256)]
)
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_prefill_attention_matches_sdpa_path(
    heads: int, kv_heads: int, head_dim: int, window, kv_dtype: torch.dtype
) -> None:
    """Chunks of several lengths (a whole prompt, a tail after a cached prefix, chunks that
    are not multiples of the 16-query or 64-key tiles) in one group, against masked SDPA."""
    query_lens, starts = [1, 17, 150, 64, 3], [0, 0, 70, 129, 200]
    lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    _, k, v, tables = _paged_case(heads + head_dim, len(lens), heads, kv_heads, head_dim, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=torch.Generator().manual_seed(7))
    reference = TorchPagedAttention([(k, v)], 0.3, [window])
    reference.paged_kernels = False
    expected = reference._group(build_group(None, query_lens, starts, tables, 16, {window}, CPU), q, k, v, window)
    group = build_group(None, query_lens, starts, tables, 16, {window}, CPU, paged_kernels=True)
    assert not group.masks and group.seq_lens is None  # no mask is built for the kernel
    assert group.query_offsets is not None and group.query_offsets.tolist() == [0, 1, 18, 168, 232, 235]
    got = TorchPagedAttention([(k, v)], 0.3, [window])._group(group, q, k, v, window)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-5)  # fp32, another summation order


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 1, 24)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_prefill_attention_is_the_same_however_the_work_is_split(
    heads: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype
) -> None:
    """With few query tiles per thread each task takes one KV head; with many, all of a tile's heads
    (so a token's row is read whole). Verification steps (a few drafts after a long context, whose next
    key tiles are prefetched as the kernel goes) and prefill chunks alike: the split changes no bit."""
    query_lens, starts = [6, 6, 2, 1, 40, 6, 3], [300, 131, 7, 64, 90, 0, 250]
    lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    _, k, v, tables = _paged_case(heads * 3 + head_dim, len(lens), heads, kv_heads, head_dim, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=torch.Generator().manual_seed(11))
    group = build_group(None, query_lens, starts, tables, 16, {None}, CPU, paged_kernels=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 16):  # 9 query tiles: all heads per task at 1 and 2 threads, one at 16
            torch.set_num_threads(threads)
            outs.append(TorchPagedAttention([(k, v)], 0.3, [None])._group(group, q, k, v, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    reference = TorchPagedAttention([(k, v)], 0.3, [None])
    reference.paged_kernels = False
    expected = reference._group(build_group(None, query_lens, starts, tables, 16, {None}, CPU), q, k, v, None)
    torch.testing.assert_close(outs[0], expected, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize(("query_lens", "starts"), [([8], [1300]), ([6, 6], [900, 2000]), ([20], [700]), ([3], [0])])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_prefill_attention_cuts_long_keys_of_few_tasks(
    threads: int, query_lens: list[int], starts: list[int], window, kv_dtype: torch.dtype
) -> None:
    """One or two agents' verification steps are too few tasks for the threads (3 KV heads on 2): each
    task's keys are cut into chunks merged after (how many depends on the thread count, so each is tried),
    where a context is long enough; the result is masked SDPA's, windows and the query's own keys included."""
    lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    _, k, v, tables = _paged_case(sum(lens), len(lens), 9, 3, 64, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(sum(query_lens), 9, 64, generator=torch.Generator().manual_seed(5))
    reference = TorchPagedAttention([(k, v)], 0.125, [window])
    reference.paged_kernels = False
    expected = reference._group(build_group(None, query_lens, starts, tables, 16, {window}, CPU), q, k, v, window)
    group = build_group(None, query_lens, starts, tables, 16, {window}, CPU, paged_kernels=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = TorchPagedAttention([(k, v)], 0.125, [window])._group(group, q, k, v, window)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 1, 256), (4, 4, 32)])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
# a step of chunks, drafts and tails; one agent's drafts after a long context (few tasks: its keys cut in chunks)
@pytest.mark.parametrize(("query_lens", "starts"), [([1, 17, 150, 9, 3], [0, 0, 70, 1300, 61]), ([8], [1300])])
def test_bf16_prefill_attention_is_attention_on_rounded_operands(
    heads: int, kv_heads: int, head_dim: int, window, kv_dtype: torch.dtype, query_lens: list[int], starts: list[int]
) -> None:
    """--dtype bfloat16's prefill attention (its two products on AMX): the attention of the scaled queries, keys
    and values rounded to bf16, up to the probabilities' own rounding; on a CPU without AMX, or for a head size
    that is not a multiple of 64, the fp32 kernel's result to the bit."""
    lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    _, k, v, tables = _paged_case(heads + head_dim, len(lens), heads, kv_heads, head_dim, lens)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=torch.Generator().manual_seed(3))
    g = build_group(None, query_lens, starts, tables, 16, {window}, CPU, paged_kernels=True)
    args = (q, k, v, g.block_tables, g.query_offsets, g.context_starts, window, 0.3)
    got, fp32 = kernels.paged_prefill_attention(*args, bf16=True), kernels.paged_prefill_attention(*args)
    if not kernels.amx_available() or head_dim % 64:
        assert torch.equal(got, fp32)
        return
    assert not torch.equal(got, fp32)

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.float().bfloat16().double()

    flat_k, flat_v, group = k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim), heads // kv_heads
    row = 0
    for b, (start, n) in enumerate(zip(starts, query_lens, strict=True)):
        slots = torch.tensor([tables[b][p // 16] * 16 + p % 16 for p in range(start + n)])
        keys, values, queries = bf16(flat_k[slots]), bf16(flat_v[slots]), bf16(q[row : row + n] * 0.3)
        pos, key_pos = torch.arange(start, start + n)[:, None], torch.arange(start + n)[None, :]
        hidden = (key_pos > pos) | ((key_pos <= pos - window) if window else False)
        for h in range(heads):
            scores = (queries[:, h] @ keys[:, h // group].T).masked_fill(hidden, float("-inf"))
            expected = scores.softmax(-1) @ values[:, h // group]
            torch.testing.assert_close(got[row : row + n, h].double(), expected, rtol=0, atol=6e-3)
        row += n


def test_mixed_step_routes_each_group_to_its_kernel() -> None:
    """A step with decode and prefill requests interleaved: each group's rows come back in place."""
    from agora.engine.attention import AttentionMetadata

    heads, kv_heads, dim = 9, 3, 64
    query_lens, starts = [1, 20, 1, 5], [40, 0, 9, 30]
    lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
    _, k, v, tables = _paged_case(3, 4, heads, kv_heads, dim, lens)
    q = torch.randn(sum(query_lens), heads, dim)
    slots = torch.cat(
        [
            torch.tensor([tables[b][p // 16] * 16 + p % 16 for p in range(s, s + n)])
            for b, (s, n) in enumerate(zip(starts, query_lens, strict=True))
        ]
    )
    new_k, new_v = torch.randn(len(slots), kv_heads, dim), torch.randn(len(slots), kv_heads, dim)
    offsets = [0, 1, 21, 22]
    rows = lambda members: [r for b in members for r in range(offsets[b], offsets[b] + query_lens[b])]  # noqa: E731

    def run(kernels_on: bool) -> torch.Tensor:
        backend = TorchPagedAttention([(k.clone(), v.clone())], 0.125, [None])
        backend.paged_kernels = kernels_on
        groups = [
            build_group(rows(m), [query_lens[b] for b in m], [starts[b] for b in m], [tables[b] for b in m], 16,
                        {None}, CPU, paged_kernels=kernels_on)
            for m in ([0, 2], [1, 3])
        ]  # fmt: skip
        return backend.bind(AttentionMetadata(slots, groups))(0, q, new_k, new_v)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-5)


def test_rope_in_place_matches_rotate_half_on_strided_views() -> None:
    from agora.models.layers import RotaryEmbedding

    rotary = RotaryEmbedding(64, 256, 10000.0, None)
    fused = torch.randn(5, 9 * 64 + 3 * 64)  # a fused QKV row without v: q and k are strided views
    q, k = fused[:, : 9 * 64].view(5, 9, 64), fused[:, 9 * 64 :].view(5, 3, 64)
    positions = torch.tensor([0, 3, 17, 200, 255])
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., 32:], x[..., :32]], dim=-1)

    expected_q, expected_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    with torch.no_grad():
        got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(got_q, expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-6, atol=1e-6)


def test_fused_projections_equal_the_separate_layers() -> None:
    from agora.models.llama import LlamaConfig, LlamaMLP
    from agora.models.quant import fuse_projections

    cfg = LlamaConfig(100, 64, 96, 1, 4, 2, 16, 1e-6, 10000.0, None, 128, False)
    mlp = LlamaMLP(cfg)
    for name, (n, k) in {"gate_proj": (96, 64), "up_proj": (96, 64)}.items():
        blocks, w = quantized(n, k, "Q4_1", seed=len(name))
        layer = getattr(mlp, name)
        with torch.no_grad():
            layer.weight.copy_(w)
        setattr(mlp, name, GGUFLinear(layer, blocks, "Q4_1"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        separate = mlp(x)
        assert fuse_projections(mlp) == 1 and isinstance(mlp.gate_up_proj, GGUFLinear)
        assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_proj.weight.data_ptr()  # views, not copies
        torch.testing.assert_close(mlp(x), separate, rtol=1e-5, atol=1e-5)
        assert mlp(torch.randn(100, 64)).shape == (100, 64)  # the fp32 path of the fused layer


@pytest.mark.parametrize("shape", [(1, 576), (5, 3, 64), (300, 200), (2, 7)])
def test_rms_norm_matches_torch(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(*shape) * 3, torch.randn(shape[-1])
    ref = torch.rms_norm(x, (shape[-1],), w, 1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
    # strided input (a view) is made contiguous first, not read wrongly
    wide = torch.randn(4, 2 * shape[-1])
    view = wide[:, : shape[-1]]
    torch.testing.assert_close(kernels.rms_norm(view, w, 1e-6), torch.rms_norm(view, (shape[-1],), w, 1e-6))


@pytest.mark.parametrize("rows,inter", [(1, 1536), (33, 100), (3, 5)])
def test_silu_mul_matches_torch_including_extremes(rows: int, inter: int) -> None:
    torch.manual_seed(1)
    gate_up = torch.randn(rows, 2 * inter) * 6
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -88.0])
    gate, up = gate_up.chunk(2, -1)
    ref = F.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(gate_up), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 7), (3, 8), (2, 9), (5, 100), (40, 4099), (2, 262144)])
@pytest.mark.parametrize("case", ["random", "ties", "nan", "all -inf", "signed zeros", "last nan", "inf"])
def test_argmax_matches_torch(rows: int, n: int, case: str) -> None:
    """The same index as torch.argmax: the first of the largest value (ties in one lane and across
    lanes), a NaN as the largest (the first NaN), -inf rows, -0.0 against 0.0, rows past the vector tail."""
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, n, generator=g)
    if case == "ties":
        x = torch.randint(-2, 3, (rows, n), generator=g).float()
    elif case == "nan":
        x[:, n // 2] = float("nan")
        x[:, -1] = float("nan")
    elif case == "all -inf":
        x.fill_(float("-inf"))
    elif case == "signed zeros":
        x = torch.zeros(rows, n)
        x[:, ::3] = -0.0
    elif case == "last nan":
        x[:, -1] = float("nan")
    elif case == "inf":
        x[:, ::5] = float("inf")
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    if n > 1:  # rows of a wider tensor (row stride beyond the row)
        view = x[:, : n - 1]
        assert torch.equal(kernels.argmax(view), view.argmax(dim=-1))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_two_byte_caches_are_read_exactly(kv_dtype: torch.dtype) -> None:
    """An fp16 or bf16 KV cache on CPU: the kernels read it, and what they compute is what they compute on
    the same values widened to fp32 (both widenings are exact; the compiler may contract a tail's products
    differently, so to an ulp or so): decode and prefill."""
    q, k, v, tables = _paged_case(5, 2, 9, 3, 64, [30, 50])
    k2, v2 = k.to(kv_dtype), v.to(kv_dtype)
    backend = TorchPagedAttention([(k2, v2)], 0.125, [None])
    assert backend.paged_kernels
    group = build_group(None, [1, 1], [29, 49], tables, 16, {None}, CPU, paged_kernels=True)
    got = kernels.paged_decode_attention(q, k2, v2, group.block_tables, group.seq_lens, None, 0.125)
    ref = kernels.paged_decode_attention(q, k2.float(), v2.float(), group.block_tables, group.seq_lens, None, 0.125)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    chunks = build_group(None, [7, 20], [23, 30], tables, 16, {None}, CPU, paged_kernels=True)
    qs = torch.randn(27, 9, 64, generator=torch.Generator().manual_seed(3))
    for bf16 in (False, True):  # the fp32 kernel, and (where there is AMX) --dtype bfloat16's products
        args = (chunks.block_tables, chunks.query_offsets, chunks.context_starts, None, 0.125)
        got = kernels.paged_prefill_attention(qs, k2, v2, *args, bf16=bf16)
        ref = kernels.paged_prefill_attention(qs, k2.float(), v2.float(), *args, bf16=bf16)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # a half-precision query (an fp16 model on CPU) is computed in fp32 and returned in its dtype
    assert backend._group(group, q.half(), k2, v2, None).dtype == torch.float16
