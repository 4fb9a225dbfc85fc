"""GGUF's Q4_K and Q6_K blocks written from fp32 weights (gguf-py dequantizes them but cannot quantize them), so
tests and benchmarks can build the files most downloads are: Q4_K_M mixes Q4_K with Q6_K.

The codes are chosen plainly (each sub-block's range split evenly, no search for the least error as llama.cpp's
quantizer makes), which changes how close the weights come to the originals, not the layout, which
``tests/models/test_gguf_kquants.py`` checks by reading the blocks back with gguf-py.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def q4_k(w: np.ndarray) -> np.ndarray:
    """[N, K] (K % 256 == 0) -> Q4_K rows [N, K / 256 * 144]: per 256 weights fp16 d and dmin, 6-bit scales and
    mins per 32 (packed in 12 bytes), then 4-bit codes; a weight is d sc_j q - dmin m_j."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(-1, 8, 32)
    lo, hi = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
    scale, offset = (hi - lo) / 15.0, -lo  # per 32: x ~ scale q - offset
    d, dmin = _f16(scale.max(axis=1) / 63.0), _f16(offset.max(axis=1) / 63.0)
    sc = np.where(d[:, None] > 0, np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin[:, None] > 0, np.rint(offset / np.where(dmin > 0, dmin, 1)[:, None]), 0)
    mn = mn.clip(0, 63).astype(np.uint8)
    step, low = d[:, None] * sc, dmin[:, None] * mn
    q = np.rint((x + low[..., None]) / np.where(step > 0, step, 1)[..., None]).clip(0, 15).astype(np.uint8)
    q[step == 0] = 0
    out = np.zeros((x.shape[0], 144), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)
    # bytes 0-3: scales 0-3 (6 bits) and scales 4-7's top 2 bits; 4-7: mins alike; 8-11: scales and mins 4-7's low 4
    out[:, 4:8] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    q = q.reshape(-1, 4, 2, 32)  # 64 weights a chunk: the first 32 in the low nibbles, the next 32 in the high
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return out.reshape(n, k // 256 * 144)


def q6_k(w: np.ndarray) -> np.ndarray:
    """[N, K] (K % 256 == 0) -> Q6_K rows [N, K / 256 * 210]: 6-bit codes (low 4 bits, then high 2 bits), an int8
    scale per 16 weights, an fp16 d per 256; a weight is d sc_j (q - 32)."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=2) / 31.0
    d = _f16(scale.max(axis=1) / 127.0)
    sc = np.where(d[:, None] > 0, np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0).clip(0, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.rint(x / np.where(step > 0, step, 1)[..., None]).clip(-32, 31) + 32).astype(np.uint8)
    q[step == 0] = 32
    q = q.reshape(-1, 2, 128)  # two halves of 128
    out = np.zeros((q.shape[0], 210), dtype=np.uint8)
    low, high = q & 0x0F, q >> 4
    out[:, 0:128] = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)  # weights j and 64 + j of a half
    h = high.reshape(-1, 2, 4, 32)  # bits 2g, 2g + 1 of byte l: weight 32 g + l of the half
    out[:, 128:192] = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out.reshape(n, k // 256 * 210)


def encode(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` [N, K] as GGUF rows of ``qtype``: Q4_K and Q6_K here, the others by gguf-py."""
    if qtype == "Q4_K":
        return q4_k(w)
    if qtype == "Q6_K":
        return q6_k(w)
    return quantize(w.astype(np.float32), GGMLQuantizationType[qtype])


def reference(w: np.ndarray, qtype: str) -> np.ndarray:
    """The weights a file of ``qtype`` holds for ``w``: its blocks dequantized by gguf-py."""
    return dequantize(encode(w, qtype), GGMLQuantizationType[qtype]).reshape(w.shape).astype(np.float32)


def q4_k_m(name: str, layers: int) -> str:
    """The format llama.cpp's Q4_K_M gives a GGUF tensor name: Q6_K for the output and, in a spread of layers
    (the first and last eighth, every third between), attn_v and ffn_down; Q4_K for the rest."""
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(name.split(".")[1])
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2:
            return "Q6_K"
    return "Q4_K"
