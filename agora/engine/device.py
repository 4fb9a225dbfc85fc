"""Everything that differs per device, in one place: choice of device and dtype, and
how much memory the KV cache may take. A new PyTorch backend (CUDA, MPS, an
out-of-tree PrivateUse1 device) needs changes here and nowhere else in the engine.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import torch

from agora import kernels
from agora.models.loader import available_memory_bytes

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 2 << 30
# Headroom left for activations and the allocator when sizing the KV cache from free memory.
ACCELERATOR_ACTIVATION_RESERVE = 1 << 30


def pick_device(name: str) -> torch.device:
    """``auto``: the best available accelerator, else the CPU."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """What a model computes in: ``dtype`` for activations (and the KV cache's ``auto`` unless ``kv_dtype``), and
    ``gemm_dtype`` for the weights of the decoder layers' matrix multiplies where it differs."""

    dtype: torch.dtype
    gemm_dtype: torch.dtype | None = None
    # prefill and verification attention's two products in bf16 on AMX where the CPU has it (fp32 softmax
    # and accumulation): --dtype bfloat16 on a CPU
    bf16_attention: bool = False
    # the KV cache's ``auto`` where it is not ``dtype``: bf16 for --dtype bfloat16 on a CPU, as on a GPU
    kv_dtype: torch.dtype | None = None


def pick_precision(name: str, device: torch.device) -> Precision:
    """``auto``: fp32 on a CPU, bf16 elsewhere. ``bfloat16`` on a CPU keeps fp32 activations
    and norms, and gives the decoder layers' linears and the lm_head bf16 weights: prefill
    GEMMs run in bf16 (oneDNN; about 2.3x fp32 on AVX512-BF16 or AMX), while steps the GGUF
    block kernels take (decode, up to 64 tokens) keep their fp32 math; with AMX, prefill and
    verification attention multiply in bf16 too. The KV cache is bf16 (as the model's dtype makes it on
    a GPU): half the bytes a decode step's attention reads, which it widens to fp32 for its fp32 math."""
    if name == "auto":
        # bf16 is emulated (slow) on most CPUs; accelerators want it.
        return Precision(torch.float32 if device.type == "cpu" else torch.bfloat16)
    if name == "bfloat16" and device.type == "cpu":
        if not cpu_has_native_bf16():
            logger.warning(
                "--dtype bfloat16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 GEMMs are emulated "
                "and likely slower than fp32; --dtype float32 is exact and faster here"
            )
        return Precision(torch.float32, torch.bfloat16, bf16_attention=True, kv_dtype=torch.bfloat16)
    return Precision(getattr(torch, name))


def cpu_has_native_bf16() -> bool:
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_kv_dtype(name: str, precision: Precision) -> torch.dtype:
    """The KV cache's element type; ``auto`` keeps the model's, so attention sees what it computed (bf16 for
    ``--dtype bfloat16`` on a CPU, whose activations are fp32: see ``pick_precision``)."""
    if name != "auto":
        return getattr(torch, name)
    return precision.kv_dtype or precision.dtype


def kv_cache_budget(device: torch.device, requested: int | None, utilization: float) -> int:
    """Bytes for the KV cache: what was asked for, else a share of a GPU's free memory (on the CPU, 2 GiB). On the
    CPU, a size past the memory the host has available is refused here, at start-up.

    Call it after the model is loaded, so its weights are already counted as used.
    """
    if device.type == "cuda" and requested is None:
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * utilization) - (total - free) - ACCELERATOR_ACTIVATION_RESERVE
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                f"at gpu_memory_utilization={utilization}); raise it or set --kv-cache-memory"
            )
        logger.info("KV cache budget from free GPU memory: %.1f GiB", budget / 2**30)
        return budget
    budget = CPU_DEFAULT_KV_BYTES if requested is None else requested
    available = available_memory_bytes() if device.type == "cpu" else None
    if available is not None and budget > available:
        # (the cache's pages are only taken as requests reach them: without this a cache the machine cannot hold
        # would start, and fail under load)
        raise ValueError(
            f"a KV cache of {budget / 2**30:.1f} GiB does not fit the {available / 2**30:.1f} GiB of memory "
            f"available; set a smaller --kv-cache-memory"
        )
    return budget


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor for the KV cache. On the CPU its memory is an anonymous mapping, which the OS hands out zeroed
    page by page as it is first touched, so nothing is written now: ``torch.zeros`` wrote the whole cache at start-up
    (2 GiB took 2.4-3.1 s on every engine start on 2 cores) and kept every page resident whether a request ever
    reached it or not."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    # private (shared anonymous memory would be shmem), and page-aligned, so rows fall on cache lines as malloc's do
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)  # (the tensor keeps the mapping alive)
