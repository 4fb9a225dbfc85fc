"""The GGUF formats the kernel reads through QU8 and QU4: repacked exactly, multiplied as fp32 on the file's
weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize, quantize

from agora import kernels
from agora.models import gguf_repack

# Each format's block: (weights, bytes, byte offsets of its fp16 scales)
LAYOUT = {
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}


def random_rows(n: int, k: int, qtype: str, seed: int) -> np.ndarray:
    """[n, k] weights as random blocks of ``qtype``: every code, sub-scale and high bit drawn at random, the fp16
    scales finite (any bytes are a valid block otherwise)."""
    size, nbytes, halves = LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * k // size, nbytes), dtype=np.uint8)
    for at in halves:
        scale = rng.uniform(-0.02, 0.02, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


def test_the_layouts_are_gguf_s() -> None:
    for qtype, (size, nbytes, _) in LAYOUT.items():
        assert gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)] == (size, nbytes)
    assert set(LAYOUT) == set(gguf_repack.FORMATS)


def decode(packed: np.ndarray, fmt: str) -> np.ndarray:
    """QU8 or QU4 rows decoded apart from repack's own check: QU8 fp32 d0 d1 m0 m1 (per 16 weights), then 32
    codes; QU4 fp32 d m, then 16 bytes whose low nibbles are weights 0-15 and high ones 16-31."""
    blk = packed.reshape(-1, kernels.BLOCK_BYTES[fmt])
    if fmt == "QU8":
        scales = blk[:, :16].copy().view(np.float32)
        d, m, q = np.repeat(scales[:, :2], 16, axis=1), np.repeat(scales[:, 2:], 16, axis=1), blk[:, 16:]
    else:
        scales = blk[:, :8].copy().view(np.float32)
        d, m, q = scales[:, :1], scales[:, 1:], np.concatenate([blk[:, 8:] & 0x0F, blk[:, 8:] >> 4], axis=1)
    return (d * q + m).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("qtype", gguf_repack.FORMATS)
def test_repack_gives_back_every_weight_exactly(qtype: str) -> None:
    rows = random_rows(24, 512, qtype, seed=1)
    expected = dequantize(rows, getattr(gguf.GGMLQuantizationType, qtype)).reshape(24, 512)
    packed = gguf_repack.repack(rows, qtype, expected)
    fmt = gguf_repack.target(qtype)
    assert fmt == ("QU4" if qtype in ("Q4_0", "Q4_1", "Q4_K") else "QU8")
    assert packed is not None and packed.shape == (24, 512 // 32 * kernels.BLOCK_BYTES[fmt])
    assert np.array_equal(decode(packed, fmt), expected)


def test_qu4_is_half_the_size_of_qu8() -> None:
    assert kernels.BLOCK_BYTES["QU4"] * 2 == kernels.BLOCK_BYTES["QU8"]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q4_1"])
def test_four_bit_formats_repack_to_either_format_and_qu4_to_qu8(qtype: str) -> None:
    """What fusing layers of different formats does: a Q4_1 part joins QU4 parts; a QU4 part joins QU8 ones."""
    if qtype == "Q4_1":
        rows = quantize(
            np.random.default_rng(5).standard_normal((24, 512)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1
        )
    else:
        rows = random_rows(24, 512, qtype, seed=3)
    expected = dequantize(rows, getattr(gguf.GGMLQuantizationType, qtype)).reshape(24, 512)
    qu4 = gguf_repack.repack(rows, qtype, expected, to="QU4")
    qu8 = gguf_repack.repack(rows, qtype, expected, to="QU8")
    assert qu4 is not None and qu8 is not None
    assert np.array_equal(decode(qu4, "QU4"), expected) and np.array_equal(decode(qu8, "QU8"), expected)
    assert np.array_equal(gguf_repack.repack(qu4, "QU4", expected, to="QU8"), qu8)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_qu4_refuses_codes_past_4_bits(qtype: str) -> None:
    with pytest.raises(ValueError, match="4-bit"):
        gguf_repack.repack(random_rows(8, 256, qtype, seed=2), qtype, to="QU4")


def test_repack_refuses_rows_it_cannot_give_back() -> None:
    rows = random_rows(8, 256, "Q4_K", seed=2)
    wrong = dequantize(rows, gguf.GGMLQuantizationType.Q4_K).reshape(8, 256).copy()
    wrong[3, 7] = np.nextafter(wrong[3, 7], np.float32(1))
    assert gguf_repack.repack(rows, "Q4_K", wrong) is None


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
@pytest.mark.parametrize("qtype", gguf_repack.FORMATS)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 23])
@pytest.mark.parametrize(("n", "k"), [(96, 256), (333, 512), (200, 1792)])
def test_repacked_linear_matches_fp32_on_the_file_s_weights(qtype: str, m: int, n: int, k: int) -> None:
    rows = random_rows(n, k, qtype, seed=m)
    w = torch.from_numpy(dequantize(rows, getattr(gguf.GGMLQuantizationType, qtype)).reshape(n, k).copy())
    packed = torch.from_numpy(gguf_repack.repack(rows, qtype))
    x, bias = torch.randn(m, k), torch.randn(n)
    got = kernels.linear(x, packed, gguf_repack.target(qtype), bias)
    # random codes make weights of up to ~80: bound the error by the products' magnitudes, as fp32 sums round
    exact = F.linear(x.double(), w.double(), bias.double())
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T + bias.abs().double())
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((F.linear(x, w, bias).double() - exact).abs() <= bound).all()  # what torch's fp32 GEMM meets too


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
@pytest.mark.parametrize("qtype", gguf_repack.FORMATS)
def test_repacked_blocks_dequantize_to_the_file_s_weights(qtype: str) -> None:
    rows = random_rows(200, 512, qtype, seed=1)
    w = torch.from_numpy(dequantize(rows, getattr(gguf.GGMLQuantizationType, qtype)).reshape(200, 512).copy())
    for fmt in {gguf_repack.target(qtype), "QU8"}:
        packed = torch.from_numpy(gguf_repack.repack(rows, qtype, to=fmt))
        assert torch.equal(kernels.dequantize(packed, fmt, 512), w)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_the_formats_read_as_stored_repack_exactly_too(qtype: str) -> None:
    """What fusing layers of different formats does (Gemma's v in Q8_0 beside q and k in Q5_0): QU8 for all."""
    w = np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    rows = quantize(w, t)
    rows[0, 2:34] = 0x80 if qtype == "Q8_0" else rows[0, 2:34]  # Q8_0's -128, which its quantizer never writes
    expected = dequantize(rows, t).reshape(16, 256)
    assert gguf_repack.repack(rows, qtype, expected, to="QU8") is not None
