"""Native CPU kernels (``cpu.c``), compiled once with the system C compiler, loaded with ctypes.

The build takes about a second and lands in ``$AGORA_CACHE_DIR/kernels/``, keyed by
the source, the flags, the compiler and this CPU's feature flags (it is built with
``-march=native``, or for ``AGORA_CPU_ISA``: ``avx2`` or ``generic``). Without a compiler, or with
``AGORA_CPU_KERNELS=0``, ``lib()`` returns None and every caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from agora import envs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
_BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno"]
# envs.cpu_isa(): this CPU; x86-64-v3 (AVX2, FMA, F16C and no AVX-512, as on AMD Zen 3); no SIMD paths
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=native"], "generic": []}


def flags(isa: str | None = None) -> list[str]:
    """The compiler flags of a build for ``isa`` (default: ``AGORA_CPU_ISA``'s, else this CPU)."""
    return [*_BASE_FLAGS, *ISA_FLAGS[isa or envs.cpu_isa()]]


# Block formats the linear kernel reads: GGUF's Q4_1 and Q8_0 as the file stores them, and QU8 and QU4, the other
# GGUF formats repacked at load time (agora.models.gguf_repack: fp32 scale and offset per 16 weights and uint8
# codes; for the 4-bit formats, per 32 weights and nibbles).
QTYPES = ("Q4_1", "Q8_0", "QU8", "QU4")
I8_QTYPES = QTYPES  # the formats the int8-activation kernel reads
_FORMATS = {"Q4_1": 0, "Q8_0": 1, "QU8": 2, "QU4": 3}  # cpu.c's FMT_*
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34, "QU8": 48, "QU4": 24}  # per 32 weights
I8_GROUP = 8  # weight rows the int8-activation kernel computes together (repack_i8's groups)
# KV cache element types the attention kernels read, as cpu.c's KV_F32, KV_F16, KV_BF16
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "agora_kernels_avx2": ([], ctypes.c_int),
    "agora_kernels_avx512": ([], ctypes.c_int),
    "agora_linear_q4_1": ([_P, _I, _I, _P, _I, _P, _P, _I], None),
    "agora_linear_q8_0": ([_P, _I, _I, _P, _I, _P, _P, _I], None),
    "agora_linear_qu8": ([_P, _I, _I, _P, _I, _P, _P, _I], None),
    "agora_linear_qu4": ([_P, _I, _I, _P, _I, _P, _P, _I], None),
    "agora_dequant": ([_I, _P, _I, _I, _P, _I], None),
    "agora_linear_i8": ([_I, _P, _I, _I, _P, _I, _P, _P, _P, _I], None),
    "agora_linear_i8_scratch_floats": ([_I, _I], _I),
    "agora_repack_i8": ([_P, _I, _I, _I, _P], None),
    "agora_unrepack_i8": ([_P, _I, _I, _I, _P], None),
    "agora_dequant_i8": ([_I, _P, _I, _I, _P, _I], _I),
    "agora_rope": ([_P, _I, _I, _P, _I, _I, _P, _P, _P, _I, _I, _I], None),
    "agora_silu_mul": ([_P, _I, _I, _P, _I], None),
    "agora_gelu_tanh_mul": ([_P, _I, _I, _P, _I], None),
    "agora_rms_norm": ([_P, _I, _I, _P, _F, _P, _I], None),
    "agora_paged_decode_attention": ([_P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _I, _F, _P, _I, _I], None),
    "agora_paged_prefill_attention": ([_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, _I, _I, _I], None),
    "agora_amx_init": ([], _I),
    "agora_argmax": ([_P, _I, _I, _I, _P, _I], None),
    "agora_kernel_timing": ([_I], None),
    "agora_set_l1d_bytes": ([_I], None),
    "agora_tile_rows": ([], _I),
    "agora_kernel_time_ns": ([], _I),
    "agora_llama_scratch_floats": ([_P, _I], _I),
    "agora_llama_layer": ([_P, _P, _P, _I, _P, _P, _P, _P, _I], None),
}


# -- one decoder layer per call: the structs of cpu.c, field for field ------------------------------


class QLinear(ctypes.Structure):
    """A linear layer as GGUF blocks: ``w`` [n, k / 32 * block bytes], ``bias`` [n] or NULL."""

    _fields_ = [("w", _P), ("bias", _P), ("n", _I), ("k", _I), ("fmt", _I), ("i8", _I)]


class LlamaWeights(ctypes.Structure):
    """One Llama-family decoder layer's weights (pointers into the model's own tensors)."""

    _fields_ = [
        ("layer", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
        ("eps", _F), ("in_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
        ("qkv", QLinear), ("o", QLinear), ("gate_up", QLinear), ("down", QLinear),
        ("post_attn_norm", _P), ("post_mlp_norm", _P), ("gelu", _I),
    ]  # fmt: skip


class AttentionGroup(ctypes.Structure):
    """``agora.engine.attention.AttentionGroup`` as the kernels read it: decode (``seq_lens``) or
    chunks (``q_offsets``, ``ctx_starts``); ``token_index`` NULL means every row of the step."""

    _fields_ = [
        ("decode", _I), ("n_tokens", _I), ("token_index", _P), ("batch", _I), ("block_tables", _P),
        ("bt_stride", _I), ("seq_lens", _P), ("q_offsets", _P), ("ctx_starts", _P),
    ]  # fmt: skip


class Attention(ctypes.Structure):
    """A step's paged attention: per-layer caches and windows, slots, up to two groups."""

    _fields_ = [
        ("k_caches", _P), ("v_caches", _P), ("windows", _P), ("slots", _P), ("block_size", _I), ("kv", _I),
        ("amx", _I), ("scale", _F), ("n_groups", _I), ("groups", AttentionGroup * 2),
    ]  # fmt: skip


def qlinear(
    blocks: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None, int8: bool = False
) -> QLinear:
    """The struct for a GGUF-block linear layer (its tensors must outlive the struct)."""
    bias_ptr = None if bias is None else bias.data_ptr()
    rows = blocks.shape[0] * (I8_GROUP if int8 else 1)
    return QLinear(blocks.data_ptr(), bias_ptr, rows, in_features, _FORMATS[qtype], int(int8))


def llama_scratch(weights: LlamaWeights, rows: int) -> torch.Tensor:
    """Preallocated scratch for ``rows`` tokens of a layer (reused by every layer and step)."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    return torch.empty(k.agora_llama_scratch_floats(ctypes.byref(weights), rows), dtype=torch.float32)


def llama_layer(
    weights: LlamaWeights, attention: Attention, x: torch.Tensor, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scratch: torch.Tensor,
) -> None:  # fmt: skip
    """One decoder layer on ``x [T, hidden]`` (fp32, contiguous) in place: norms, QKV, RoPE, the
    cache write, attention, o_proj, MLP and both residuals, as the module path computes them."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    k.agora_llama_layer(
        ctypes.byref(weights), ctypes.byref(attention), x.data_ptr(), x.shape[0], positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), scratch.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


@functools.cache
def _cpuinfo_lines() -> tuple[str, str]:
    """The first CPU's ``vendor_id`` and feature-flags lines of /proc/cpuinfo ("" where absent)."""
    vendor = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not vendor and line.startswith("vendor_id"):
                    vendor = line
                elif line.startswith(("flags", "Features")):  # Features: ARM's name for it
                    flags = line
                    break
    except OSError:
        pass
    return vendor, flags


def cpu_vendor() -> str:
    """This CPU's vendor as /proc/cpuinfo names it (GenuineIntel, AuthenticAMD), or ""."""
    vendor = _cpuinfo_lines()[0]
    return vendor.split(":", 1)[1].strip() if ":" in vendor else ""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (avx2, avx512f, amx_bf16, ...) as /proc/cpuinfo lists them."""
    flags = _cpuinfo_lines()[1]
    return frozenset(flags.split(":", 1)[1].split()) if ":" in flags else frozenset()


def _cpu_signature() -> str:
    return _cpuinfo_lines()[1]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    build_flags = flags()
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(build_flags), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    out = envs.cache_dir() / "kernels" / f"agora-cpu-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling agora's CPU kernels (once; cached in %s)", out.parent)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *build_flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are off or cannot be built (logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if not envs.cpu_kernels():
            logger.info("CPU kernels are off (AGORA_CPU_KERNELS=0): using the PyTorch paths")
            return None
        cc = _compiler()
        if cc is None:
            logger.warning("no C compiler found (set CC): CPU kernels off, using the slower PyTorch paths")
            return None
        try:
            so = _build(cc)
            loaded = ctypes.CDLL(str(so))
            for name, (args, res) in _SIGNATURES.items():
                fn = getattr(loaded, name)
                fn.argtypes, fn.restype = args, res
        except Exception as exc:  # noqa: BLE001 - any build or load failure means "use the fallback"
            logger.warning("CPU kernels unavailable, using the slower PyTorch paths: %s", exc)
            return None
        _lib = loaded
        return _lib


def available() -> bool:
    return lib() is not None


def time_kernels(on: bool) -> None:
    """Start (from zero) or stop summing the wall time the calling thread spends inside the
    kernels; ``kernel_seconds`` reads the sum. For benchmarks: off, it costs a branch a call."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    k.agora_kernel_timing(int(on))


def set_l1d_bytes(n: int) -> None:
    """Plan the block kernels' tiles for an L1 data cache of ``n`` bytes (0: the host's): at 48 KB
    and more an AVX-512 build multiplies up to 16 rows of x per unpacked block, else 8. For tests."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    k.agora_set_l1d_bytes(int(n))


def tile_rows() -> int:
    """The most rows of x the block kernels multiply per unpacked block: with AVX-512 16 where L1 holds
    48 KB, else 8; with AVX2 10; 8 without either (and without the kernels)."""
    k = lib()
    return int(k.agora_tile_rows()) if k is not None else 8


def kernel_seconds() -> float:
    k = lib()
    assert k is not None, "CPU kernels are not available"
    return k.agora_kernel_time_ns() / 1e9


def repack_i8(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF rows ``[N, K / 32 * block_bytes]`` (N a multiple of 8) in the int8-activation kernel's
    layout: groups of 8 rows, each block of the 8 rows interleaved 4 weights at a time, as
    ``[N / 8, K / 32 * tile bytes]`` (the same bytes in all: a tile is its 8 blocks' bytes)."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    n, row_bytes = blocks.shape
    assert n % I8_GROUP == 0, f"int8 activations need whole groups of {I8_GROUP} rows, got {n}"
    assert qtype in I8_QTYPES, f"int8 activations read {'/'.join(I8_QTYPES)} blocks, not {qtype}"
    nb = row_bytes // BLOCK_BYTES[qtype]
    blocks = blocks.contiguous()
    out = torch.empty(n // I8_GROUP, row_bytes * I8_GROUP, dtype=torch.uint8)
    k.agora_repack_i8(blocks.data_ptr(), n, nb * 32, _FORMATS[qtype], out.data_ptr())
    return out


def unrepack_i8(tiles: torch.Tensor, qtype: str) -> torch.Tensor:
    """``repack_i8``'s inverse: GGUF rows ``[N, K / 32 * block_bytes]`` back from its tiles."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    groups, tile_row = tiles.shape
    nb = tile_row // I8_GROUP // BLOCK_BYTES[qtype]
    out = torch.empty(groups * I8_GROUP, tile_row // I8_GROUP, dtype=torch.uint8)
    k.agora_unrepack_i8(tiles.contiguous().data_ptr(), groups * I8_GROUP, nb * 32, _FORMATS[qtype], out.data_ptr())
    return out


def linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None, int8: bool = False
) -> torch.Tensor:
    """``x @ W.T + bias`` for fp32 ``x [..., K]`` and W as GGUF blocks ``[N, K / 32 * block_bytes]``;
    ``int8``: W as ``repack_i8`` left it, and x quantized to int8 in blocks of 32 first
    (llama.cpp's numerics: faster, not exact)."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, kdim = x2.shape
    n = qweight.shape[0] * (I8_GROUP if int8 else 1)
    y = torch.empty(m, n, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.data_ptr()
    threads = torch.get_num_threads()
    if int8:
        scratch = torch.empty(k.agora_linear_i8_scratch_floats(m, kdim), dtype=torch.float32)
        k.agora_linear_i8(_FORMATS[qtype], x2.data_ptr(), m, kdim, qweight.data_ptr(), n, bias_ptr, y.data_ptr(),
                          scratch.data_ptr(), threads)  # fmt: skip
    else:
        fn = {"Q4_1": k.agora_linear_q4_1, "Q8_0": k.agora_linear_q8_0, "QU8": k.agora_linear_qu8,
              "QU4": k.agora_linear_qu4}[qtype]  # fmt: skip
        fn(x2.data_ptr(), m, kdim, qweight.data_ptr(), n, bias_ptr, y.data_ptr(), threads)
    return y.view(*shape[:-1], n)


def dequantize(
    qweight: torch.Tensor, qtype: str, k: int, out: torch.Tensor | None = None, int8: bool = False
) -> torch.Tensor:
    """W ``[N, k]`` in fp32 from its GGUF blocks ``[N, k / 32 * block_bytes]`` (Q4_1, Q8_0, QU8 or QU4): the
    weights ``linear`` multiplies with, into ``out`` (its first N * k floats) where given. ``int8``: from the
    int8 kernel's tiles (``repack_i8``) instead, the same weights."""
    lib_ = lib()
    assert lib_ is not None, "CPU kernels are not available"
    n = qweight.shape[0] * (I8_GROUP if int8 else 1)
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    else:
        assert out.dtype == torch.float32 and out.is_contiguous() and out.numel() >= n * k
        out = out.view(-1)[: n * k].view(n, k)
    threads = torch.get_num_threads()
    if not int8:
        lib_.agora_dequant(_FORMATS[qtype], qweight.contiguous().data_ptr(), n, k, out.data_ptr(), threads)
    elif lib_.agora_dequant_i8(_FORMATS[qtype], qweight.contiguous().data_ptr(), n, k, out.data_ptr(), threads):
        raise MemoryError(f"no memory to dequantize a {n} x {k} {qtype} weight from its int8 tiles")
    return out


def kv_kind(dtype: torch.dtype) -> int:
    """cpu.c's code for a KV cache element type (one of ``KV_DTYPES``)."""
    return KV_DTYPES.index(dtype)


def _paged_attention(
    name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    per_request: tuple[int, ...], window: int | None, scale: float, *extra: int,
) -> torch.Tensor:  # fmt: skip
    """Call ``name``: both attention kernels take (q, caches, block tables, *per_request, H, Hkv, D, block size,
    window, scale, out, threads, the caches' element type, *extra)."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    q = q.contiguous()
    h, d = q.shape[1], q.shape[2]
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    getattr(k, name)(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        *per_request, h, hkv, d, block_size, window or 0, scale, out.data_ptr(), torch.get_num_threads(),
        kv_kind(k_cache.dtype), *extra,
    )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """One query per request: ``q [B, H, D]`` (fp32) over ``seq_lens[b]`` keys of the paged
    cache (fp32, fp16 or bf16, see ``KV_DTYPES``)."""
    per_request = (seq_lens.data_ptr(), q.shape[0])
    return _paged_attention(
        "agora_paged_decode_attention", q, k_cache, v_cache, block_tables, per_request, window, scale
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_offsets: torch.Tensor,
    context_starts: torch.Tensor,
    window: int | None,
    scale: float,
    bf16: bool = False,
) -> torch.Tensor:
    """Causal attention of each request's new tokens: request ``b`` owns rows
    ``query_offsets[b]:query_offsets[b + 1]`` of ``q [T, H, D]`` (fp32), at positions from
    ``context_starts[b]`` on, and attends to every cached key up to its own position. ``bf16``
    (where ``amx_available()``, for head sizes that are multiples of 64; elsewhere ignored): its two
    products on AMX in bf16, fp32 softmax and accumulation (``--dtype bfloat16``)."""
    per_request = (query_offsets.data_ptr(), context_starts.data_ptr(), context_starts.shape[0])
    return _paged_attention(
        "agora_paged_prefill_attention", q, k_cache, v_cache, block_tables, per_request, window, scale, int(bf16)
    )


@functools.cache
def amx_available() -> bool:
    """Whether prefill attention can run its products on AMX (``paged_prefill_attention(bf16=True)``): a
    build for a CPU with AMX-BF16 whose kernel let this process use the tile registers."""
    k = lib()
    return k is not None and k.agora_amx_init() == 1


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place (rotate-half layout); the last two
    dims of each must be contiguous, the token stride may be anything (views of a fused QKV)."""
    k_lib = lib()
    assert k_lib is not None, "CPU kernels are not available"
    t, hq, d = q.shape
    assert q.stride()[1:] == (d, 1) and k.stride()[1:] == (d, 1) and cos.is_contiguous() and sin.is_contiguous()
    k_lib.agora_rope(
        q.data_ptr(), q.stride(0), hq, k.data_ptr(), k.stride(0), k.shape[1], positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), t, d, torch.get_num_threads(),
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x ** 2, -1) + eps) * weight`` for fp32 ``x [..., H]``."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    x = x.contiguous()
    h = x.shape[-1]
    y = torch.empty_like(x)
    k.agora_rms_norm(x.data_ptr(), x.numel() // h, h, weight.data_ptr(), eps, y.data_ptr(), torch.get_num_threads())
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for fp32 ``x [R, n]`` on the CPU whose rows are contiguous: the same indices
    (the first of the largest value; a NaN counts as largest), several times faster than PyTorch's."""
    k = lib()
    assert k is not None, "CPU kernels are not available"
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    k.agora_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up [..., 2I]`` holds gate then up (a fused projection)."""
    return _gated(gate_up, "agora_silu_mul")


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` (Gemma's MLP), ``gate_up`` as in ``silu_mul``."""
    return _gated(gate_up, "agora_gelu_tanh_mul")


def _gated(gate_up: torch.Tensor, kernel: str) -> torch.Tensor:
    k = lib()
    assert k is not None, "CPU kernels are not available"
    gate_up = gate_up.contiguous()
    i = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], i)
    getattr(k, kernel)(gate_up.data_ptr(), gate_up.numel() // (2 * i), i, y.data_ptr(), torch.get_num_threads())
    return y
