"""The CPU kernels (``agora/kernels/cpu.c``) as of a git revision, for side-by-side benchmarks.

``--against REV`` in ``cpu_prefill_attention.py``, ``cpu_decode_attention.py`` and ``cpu_linear_rows.py``: the
source of that revision compiled with today's compiler and flags (``build``; ``isa="avx2"``: for an AVX2 host's
paths, as ``AGORA_CPU_ISA=avx2`` builds the engine's), every exported function typed as ``agora.kernels`` types its
own (``attention_kernel``: an attention kernel of a revision from before the caches' element type was an argument).
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from agora import kernels


def build(source: Path, out: Path, isa: str | None = None, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile ``source`` as the engine compiles ``cpu.c`` (its compiler, ``CC``, and flags), for ``isa``
    (``kernels.ISA_FLAGS``; default: as the engine would, ``AGORA_CPU_ISA``), and load it with the kernels'
    signatures (functions it lacks stay untyped)."""
    cc = kernels._compiler()
    if cc is None:
        raise SystemExit("no C compiler: the kernels cannot be built here")
    cmd = [cc, *kernels.flags(isa), *(f"-D{d}" for d in defines), str(source), "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(out))
    for name, (args, res) in kernels._SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, res
    return lib


def kernels_at(rev: str, isa: str | None = None) -> ctypes.CDLL:
    """``agora/kernels/cpu.c`` as of ``rev``, built by ``build``."""
    source = subprocess.run(["git", "show", f"{rev}:agora/kernels/cpu.c"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent).stdout  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="agora-against-"))
    (tmp / "cpu.c").write_text(source)
    return build(tmp / "cpu.c", tmp / "cpu.so", isa)


def attention_kernel(lib: ctypes.CDLL, name: str, dtype: torch.dtype, tail: int = 0) -> Callable[..., None] | None:
    """``name`` (``agora_paged_decode_attention`` or ``agora_paged_prefill_attention``) of ``lib`` for a cache of
    ``dtype``, called with today's arguments less the element type (``tail``: how many come after it, prefill's
    ``amx``); None where that revision cannot read such a cache. Before the element type was an argument, an fp16
    cache had a kernel of its own (``name_f16``) and a bf16 one none."""
    signature = kernels._SIGNATURES[name][0]
    at = len(signature) - 1 - tail  # the element type's place
    if not hasattr(lib, name + "_f16"):
        fn, kind = getattr(lib, name), kernels.kv_kind(dtype)
        fn.argtypes = signature
        return lambda *args: fn(*args[:at], kind, *args[at:])
    if dtype == torch.bfloat16:
        return None
    fn = getattr(lib, name + ("_f16" if dtype == torch.float16 else ""))
    fn.argtypes = signature[:at] + signature[at + 1 :]
    return fn
