"""The CPU kernels (``agora/kernels/cpu.c``) as of a git revision, for side-by-side benchmarks.

``--against REV`` in ``cpu_prefill_attention.py`` and ``cpu_linear_rows.py``: the source of that
revision compiled with today's flags, every exported function typed as ``agora.kernels`` types its own.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

from agora import kernels


def kernels_at(rev: str) -> ctypes.CDLL:
    """Compile ``agora/kernels/cpu.c`` as of ``rev`` and load it (functions it lacks stay untyped)."""
    source = subprocess.run(["git", "show", f"{rev}:agora/kernels/cpu.c"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent).stdout  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="agora-against-"))
    (tmp / "cpu.c").write_text(source)
    subprocess.run(["cc", *kernels.FLAGS, str(tmp / "cpu.c"), "-o", str(tmp / "cpu.so"), "-lm"], check=True)
    lib = ctypes.CDLL(str(tmp / "cpu.so"))
    for name, (args, res) in kernels._SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, res
    return lib
