"""GGUF block formats repacked at load into the ones the CPU kernel reads fastest (QU8, QU4).

Every format here dequantizes, 16 weights at a time, to ``d * q + m``: an fp32 scale ``d`` and
offset ``m`` (products of the block's fp16 scales and its small integer sub-scales) and an
unsigned integer code ``q`` of up to 6 bits.

========  ====================================  =========================
format    a weight (gguf-py's dequantization)   as d * q + m
========  ====================================  =========================
Q4_0      d * (q - 8)                           d, -8 d
Q4_1      d * q + m                             d, m
Q5_0      d * (q - 16)                          d, -16 d
Q5_1      d * q + m                             d, m
Q4_K      d sc_j * q - dmin m_j  (per 32)       d sc_j, -dmin m_j
Q5_K      d sc_j * q - dmin m_j  (per 32)       d sc_j, -dmin m_j
Q6_K      d sc_j * (q - 32)      (per 16)       d sc_j, -32 d sc_j
========  ====================================  =========================

Each right-hand side is computed exactly in fp32 (``d sc_j`` has at most 18 significant bits, its
product with a 6-bit code at most 24) and ``d * q + m`` then rounds once, as the file's own
dequantization does, so the kernel multiplies by exactly the weights transformers loads. ``repack``
checks that on every tensor against gguf-py's dequantization and returns None where it does not
hold (the layer then keeps the fp32 GEMM).

A QU8 block holds 32 weights in 48 bytes: fp32 ``d0 d1 m0 m1`` (weights 0-15 and 16-31), then the
32 codes, one byte each: 12 bits a weight, against 32 for the fp32 copy a decode step would
otherwise read. The 4-bit formats (Q4_0, Q4_1, Q4_K: one ``d``, ``m`` per 32 weights, codes under 16) go to
QU4 instead, half that: 32 weights in 24 bytes, fp32 ``d m``, then Q4_1's 16 bytes of nibbles (low:
weights 0-15, high: 16-31), 6 bits a weight. A Q4_K_M file's bulk is Q4_K, so its decode steps read
half the bytes they would as QU8.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from agora.kernels import BLOCK_BYTES

QU8_BYTES = BLOCK_BYTES["QU8"]  # per 32 weights: 4 fp32, 32 uint8
QU4_BYTES = BLOCK_BYTES["QU4"]  # per 32 weights: 2 fp32, 16 bytes of nibbles
# Repacked at load. The kernel reads Q8_0 as stored, and Q4_1 too (the int8-activation kernel reads it so), but
# Q4_1 as QU4 a step is faster for a fifth more bytes: its fp16 scale and offset cost more to widen on every read
# than they save (Intel Xeon with AMX, 2 cores, SmolLM2's Q4_1 file, medians of 5 alternating runs: decode
# 7.7 -> 7.4 ms a step at batch 1, 40.7 -> 38.1 at 16; with the kernels built for AVX2 11.1 -> 8.3 and
# 56.4 -> 54.8; benchmarks/results/cpu_decode_qu4_intel*.json).
FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
AS_STORED = ("Q8_0",)  # what the loader keeps as the file stores it
AS_STORED_I8 = ("Q4_1", "Q8_0")  # the same with int8 activations: Q4_1's tiles hold its fp16 fields as they are
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K", "QU4")  # one d, m per 32 weights and codes under 16: QU4 holds them
# Repacked by widening fp16 fields to fp32 only, no arithmetic: the same weights by construction, so loading needs
# no dequantized copy to check them against.
WIDENED = ("Q4_1",)


def target(qtype: str) -> str:
    """The format a GGUF format of FORMATS is repacked to."""
    return "QU4" if qtype in FOUR_BIT else "QU8"


def _f16(raw: np.ndarray) -> np.ndarray:
    """fp16 fields (the last axis: 2 bytes) as fp32 [..., 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] codes: the low nibbles are weights 0-15, the high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[blocks, 4] bytes (a little-endian uint32) -> [blocks, 32]: bit j of weight j, at 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return (bits << 4).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> [blocks, 8] each."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _parts(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d [n, w/16], m [n, w/16] fp32, q [n, w] uint8) of ``blocks`` [n, bytes] holding w weights each."""
    n = blocks.shape[0]
    if qtype == "QU4":  # (fusing it with layers of a wider format)
        dm = np.ascontiguousarray(blocks[:, 0:8]).view(np.float32)
        return np.repeat(dm[:, :1], 2, axis=1), np.repeat(dm[:, 1:], 2, axis=1), _nibbles(blocks[:, 8:24])
    if qtype in ("Q4_0", "Q5_0", "Q5_1", "Q4_1", "Q8_0"):
        d = _f16(blocks[:, 0:2])
        if qtype == "Q8_0":  # d * q for q in -128..127: d * (q + 128) - 128 d
            q, m = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), -128.0 * d
        elif qtype == "Q4_1":
            q, m = _nibbles(blocks[:, 4:20]), _f16(blocks[:, 2:4])
        elif qtype == "Q4_0":
            q, m = _nibbles(blocks[:, 2:18]), -8.0 * d
        elif qtype == "Q5_0":
            q, m = _nibbles(blocks[:, 6:22]) | _high_bits(blocks[:, 2:6]), -16.0 * d
        else:
            q, m = _nibbles(blocks[:, 8:24]) | _high_bits(blocks[:, 4:8]), _f16(blocks[:, 2:4])
        return np.repeat(d, 2, axis=1), np.repeat(m, 2, axis=1), q
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        qs = blocks[:, 16:144] if qtype == "Q4_K" else blocks[:, 48:176]
        qs = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 256)
        if qtype == "Q5_K":  # bit j of qh[l] is the fifth bit of weight 32 j + l
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            q = q | ((qh & 1) << 4).reshape(n, 256)
        scale = d * sc.astype(np.float32)  # per 32 weights
        offset = -(dmin * mn.astype(np.float32))
        return np.repeat(scale, 2, axis=1), np.repeat(offset, 2, axis=1), q
    if qtype == "Q6_K":
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        sc, d = blocks[:, 192:208].view(np.int8).astype(np.float32), _f16(blocks[:, 208:210])
        low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(n, 2, 4, 32) | (high << 4)).reshape(n, 256)
        scale = d * sc  # per 16 weights
        return scale, -32.0 * scale, q
    raise ValueError(f"no repacking for {qtype}")


def repack(
    rows: np.ndarray, qtype: str, expected: np.ndarray | None = None, to: str | None = None
) -> np.ndarray | None:
    """GGUF rows ``[N, K / block weights * block bytes]`` of ``qtype`` -> rows ``[N, K / 32 * block bytes]`` of
    ``to`` (QU8 or QU4; default ``target(qtype)``). With ``expected`` (the rows dequantized, [N, K] fp32), None
    unless every weight the blocks give back is that value exactly (a zero's sign aside)."""
    to = to or target(qtype)
    if to == "QU4" and qtype not in FOUR_BIT:
        raise ValueError(f"QU4 holds 4-bit codes, not {qtype}'s")
    nrows = rows.shape[0]
    block_bytes = QU4_BYTES if qtype == "QU4" else GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    blocks = np.ascontiguousarray(rows).reshape(-1, block_bytes)
    d, m, q = _parts(blocks, qtype)
    d, m, q = d.reshape(-1, 2), m.reshape(-1, 2), q.reshape(-1, 32)  # per 32 weights
    if expected is not None:
        got = (np.repeat(d, 16, axis=1) * q.astype(np.float32) + np.repeat(m, 16, axis=1)).reshape(nrows, -1)
        if got.shape != expected.shape or not np.array_equal(got, expected):  # (-0.0 == 0.0: same products)
            return None
    if to == "QU4":  # both halves share d and m
        out = np.empty((q.shape[0], QU4_BYTES), dtype=np.uint8)
        out[:, 0:4] = d[:, :1].astype(np.float32).view(np.uint8)
        out[:, 4:8] = m[:, :1].astype(np.float32).view(np.uint8)
        out[:, 8:24] = q[:, :16] | (q[:, 16:] << 4)
        return out.reshape(nrows, -1)
    out = np.empty((q.shape[0], QU8_BYTES), dtype=np.uint8)
    out[:, 0:8] = d.astype(np.float32).view(np.uint8)
    out[:, 8:16] = m.astype(np.float32).view(np.uint8)
    out[:, 16:48] = q
    return out.reshape(nrows, -1)
