"""The kernel tests again, with the kernels built for CPUs other than this one: AVX2 without AVX-512 (AMD Zen 3's
paths) and no SIMD at all. The engine builds for its own CPU, so without this a change to the 8-lane or plain C
paths would go untested on an AVX-512 host."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from agora import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
SUITE = Path(__file__).with_name("test_cpu_kernels.py")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_kernel_suite_passes_built_for(isa: str) -> None:
    if isa == "avx2" and (platform.machine() not in ("x86_64", "AMD64") or
                          not {"avx2", "fma", "f16c"} <= kernels.cpu_flags()):  # fmt: skip
        pytest.skip("this CPU cannot run an AVX2 build")
    if isa == "avx2" and not kernels.cpu_flags() & {"avx512f", "avx_vnni"}:
        # the kernels choose their paths by AVX-512, AVX-VNNI, AMX and AVX2 alone: without the first three, this
        # CPU's own build (-march=native) compiles the AVX2 build's paths, which test_cpu_kernels.py just ran
        pytest.skip("this CPU's own build is the AVX2 build (no AVX-512, no AVX-VNNI): its kernel tests ran already")
    env = {**os.environ, "AGORA_CPU_ISA": isa}
    probe = "from agora import kernels; k = kernels.lib(); print(k.agora_kernels_avx2(), k.agora_kernels_avx512())"
    built = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert built.stdout.split() == (["1", "0"] if isa == "avx2" else ["0", "0"]), built.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(SUITE)],
        env=env, capture_output=True, text=True, timeout=900, cwd=SUITE.parents[2],
    )  # fmt: skip
    tail = "\n".join(proc.stdout.splitlines()[-15:])
    assert proc.returncode == 0 and " passed" in tail, (
        f"the kernel tests built for {isa}:\n{tail}\n{proc.stderr[-2000:]}"
    )


def test_the_build_follows_agora_cpu_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGORA_CPU_ISA", "avx2")
    assert "-march=x86-64-v3" in kernels.flags() and "-march=native" not in kernels.flags()
    monkeypatch.setenv("AGORA_CPU_ISA", "generic")
    assert not any(f.startswith("-march") for f in kernels.flags())
    monkeypatch.delenv("AGORA_CPU_ISA")
    assert "-march=native" in kernels.flags()
    monkeypatch.setenv("AGORA_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match="AGORA_CPU_ISA='avx9': expected one of native, avx2, generic"):
        kernels.flags()
