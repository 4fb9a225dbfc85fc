"""Everything that differs per device, in one place: choice of device and dtype, and
how much memory the KV cache may take. A new PyTorch backend (CUDA, MPS, an
out-of-tree PrivateUse1 device) needs changes here and nowhere else in the engine.
"""

from __future__ import annotations

import logging

import torch

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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is emulated (slow) on most CPUs; accelerators want it.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def pick_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type; ``auto`` keeps the model's, so attention sees what it computed."""
    return model_dtype if name == "auto" else getattr(torch, name)


def kv_cache_budget(device: torch.device, requested: int | None, utilization: float) -> int:
    """Bytes for the KV cache: what was asked for, else a share of the device's free memory.

    Call it after the model is loaded, so its weights are already counted as used.
    """
    if requested is not None:
        return requested
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * utilization) - (total - free) - ACCELERATOR_ACTIVATION_RESERVE
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                f"at gpu_memory_utilization={utilization}); raise it or set --kv-cache-memory"
            )
        logger.info("KV cache budget from free GPU memory: %.1f GiB", budget / 2**30)
        return budget
    return CPU_DEFAULT_KV_BYTES
