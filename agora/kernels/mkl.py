"""fp32 GEMMs on weights packed once for MKL (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``), and MKL's
bf16 GEMM with fp32 output (``linear_bf16``).

PyTorch's CPU matmul calls MKL's sgemm, which copies the weight matrix into its own blocked layout
on every call: for a step's linears that is a second pass over every weight, from memory (a
quarter of the GEMM time of a 112-row verification step here). MKL can keep that layout instead:
pack a weight once, then multiply any number of rows by it. It is the same fp32 math: on the Intel
host it was measured on, the product equals sgemm's bit for bit for most shapes, and where MKL
splits the sum another way (SmolLM2's down projection at 97-175 rows) a few elements differ in the
last bit, no further from the float64 product than sgemm's (``tests/kernels/test_mkl.py``). Below 16
rows sgemm takes another path; the block kernels take those steps anyway.

The routines are those of the MKL that PyTorch links (``libtorch_cpu.so`` exports them); where
that library does not export them (another BLAS, another build) ``available()`` is False and the
layers keep ``F.linear``. ``AGORA_MKL_PACKED=0`` turns packing off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from agora import envs

logger = logging.getLogger(__name__)

_ROW_MAJOR, _COL_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 102, 111, 112, 151, 162  # MKL's CBLAS enums
_PACK_ROWS = 128  # the row count MKL is told to plan the packing for (the layout does not depend on it)
_LIBTORCH_CPU = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"  # the MKL PyTorch links, and exports


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if not envs.mkl_packed() or not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(_LIBTORCH_CPU))  # already loaded by torch: this only looks the symbols up
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        size = lib.SGEMM_PACK_GET_SIZE  # the Fortran name: the CBLAS one is not exported
        size.argtypes, size.restype = [ctypes.c_char_p, *[ctypes.POINTER(i)] * 3], ctypes.c_size_t
        lib.cblas_sgemm_pack.argtypes, lib.cblas_sgemm_pack.restype = [i, i, i, i, i, i, f, p, i, p], None
        lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
        lib.cblas_sgemm_compute.restype = None
    except (OSError, AttributeError) as exc:
        logger.info("MKL's packed GEMM is not available (%s): linears keep F.linear", exc)
        return None
    return lib


def available() -> bool:
    return _lib() is not None


@functools.cache
def _bf16_gemm() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """MKL's ``cblas_gemm_bf16bf16f32`` (bf16 inputs, fp32 products and output; AMX where the CPU has it)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = ctypes.CDLL(str(_LIBTORCH_CPU)).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    fn.argtypes, fn.restype = [i, i, i, i, i, i, f, p, i, p, i, f, p, i], None
    return fn


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T (+ bias)`` for fp32 ``x [..., k]`` and a bf16 ``weight [n, k]`` on the CPU: ``x`` rounded to
    bf16, the products summed and returned in fp32 (oneDNN's bf16 GEMM through ``F.linear`` rounds its output to
    bf16, which for an lm_head's logits flipped 3 of 139 greedy tokens of cpu_decode.py's text). None where MKL's
    routine is not exported."""
    fn = _bf16_gemm()
    if fn is None:
        return None
    n, k = weight.shape
    xb = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    w = weight.contiguous()
    m = xb.shape[0]
    out = torch.empty(m, n) if bias is None else bias.to(torch.float32).expand(m, n).contiguous()
    if m:  # column-major C^T = W X^T: MKL then repacks the small X, not the weight (lm_head: 10% faster at 144 rows)
        fn(_COL_MAJOR, _TRANS, _NO_TRANS, n, m, k, 1.0, w.data_ptr(), k, xb.data_ptr(), k,
           0.0 if bias is None else 1.0, out.data_ptr(), n)  # fmt: skip
    return out.view(*x.shape[:-1], n)


@dataclass(frozen=True)
class PackedWeight:
    """A weight ``[n, k]`` in MKL's packed layout for ``x @ weight.T``."""

    buffer: torch.Tensor  # bytes MKL owns the layout of
    n: int
    k: int


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight`` ([n, k], fp32, on the CPU) packed for ``linear``."""
    lib = _lib()
    assert lib is not None, "MKL's packed GEMM is not available"
    w = weight.detach().contiguous()
    assert w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2, (w.dtype, w.device, w.shape)
    n, k = w.shape
    m, cn, ck = ctypes.c_int(_PACK_ROWS), ctypes.c_int(n), ctypes.c_int(k)
    size = lib.SGEMM_PACK_GET_SIZE(b"B", ctypes.byref(m), ctypes.byref(cn), ctypes.byref(ck))
    # get_size is a bound for any code path (3-5x the weight here), and MKL writes about the weight's size of
    # it: fresh anonymous pages, which cost memory only once written (from the heap, the rest of the bound
    # would often be pages freed earlier, the dequantized weights', and count all the same)
    buffer = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
    lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, _PACK_ROWS, n, k, 1.0, w.data_ptr(), k, buffer.data_ptr())
    return PackedWeight(buffer, n, k)


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for fp32 ``x [..., k]`` on the CPU, as ``F.linear`` computes it."""
    lib = _lib()
    assert lib is not None, "MKL's packed GEMM is not available"
    x2 = x.reshape(-1, weight.k).contiguous()
    m = x2.shape[0]
    # with a bias, C starts as the bias and beta is 1, as F.linear's addmm has sgemm do it
    out = torch.empty(m, weight.n) if bias is None else bias.to(torch.float32).expand(m, weight.n).contiguous()
    if m:
        lib.cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, weight.n, weight.k, x2.data_ptr(), weight.k,
                                weight.buffer.data_ptr(), weight.k, 0.0 if bias is None else 1.0, out.data_ptr(),
                                weight.n)  # fmt: skip
    return out.view(*x.shape[:-1], weight.n)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): after the
    fp32 weights that packing replaced were freed, they would otherwise stay in the process's memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
