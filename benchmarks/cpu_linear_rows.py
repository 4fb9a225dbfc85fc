"""Where the GGUF block kernels stop paying: one linear at 16 to 256 rows, every path side by side.

    python benchmarks/cpu_linear_rows.py --out benchmarks/results/cpu_linear_rows.json
    python benchmarks/cpu_linear_rows.py --against d779add --rows 1,2,8,16,64,192   # also that commit's kernel
    python benchmarks/cpu_linear_rows.py --lm-head --rows 8,16,32,64,144 --out benchmarks/results/cpu_lm_head.json

A step of T tokens multiplies [T, K] activations by each layer's weight. Up to
``agora.models.quant.MAX_KERNEL_ROWS`` (192; 64 against bf16 GEMM weights) rows the CPU kernels
read the GGUF Q4_1 blocks (fp32 math, or int8 activations with ``--gguf-activations int8``); past
it the step goes to PyTorch's GEMM on the dequantized weight (fp32, or bf16 with ``--dtype
bfloat16``). SmolLM2-135M's three linear shapes (gate/up fused, down, q/k/v fused), synthetic
Q4_1 blocks; each figure is the median of ``--repeats`` calls, the paths alternating in one
process. The weights stay in cache here, which flatters the GEMM: in the engine they come from
memory, and whole steps (``benchmarks/cpu_verify_steps.py``) set the limit.

``--against REV`` compiles ``agora/kernels/cpu.c`` as of that git revision with the same flags and
times its fp32 kernel beside today's (``same_as_against``: whether their outputs are equal bit for bit).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from kernels_at import kernels_at

from agora import kernels
from agora.bench.report import cpu_description
from agora.kernels import mkl
from agora.models import quant
from agora.models.quant import gemm

SHAPES = [(3072, 576), (576, 1536), (960, 576)]  # (out, in): gate/up, down, qkv
LM_HEAD = (49152, 576)
ROWS = [16, 32, 64, 96, 128, 192, 256]


def q4_1_blocks(n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random Q4_1 rows [n, k / 32 * 20]: fp16 scale and minimum, then 16 bytes of 4-bit values."""
    nb = k // 32
    blocks = np.zeros((n, nb, 20), np.uint8)
    blocks[:, :, 0:2] = (rng.random((n, nb)) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 2:4] = (-rng.random((n, nb)) * 0.05).astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return torch.from_numpy(blocks.reshape(n, nb * 20).copy())


def against_linear(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The Q4_1 fp32 kernel of another revision, called as ``kernels.linear`` calls today's."""
    y = torch.empty(x.shape[0], blocks.shape[0])
    lib.agora_linear_q4_1(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), blocks.shape[0], None, y.data_ptr(),
                          torch.get_num_threads())  # fmt: skip
    return y


def lm_head_paths(x: torch.Tensor, blocks_i8: torch.Tensor, weight: torch.Tensor, packed, weight_bf16: torch.Tensor):  # noqa: ANN001
    """An lm_head's paths (--lm-head): the Q8_0 int8 kernel, its fp32 GEMM (packed for MKL where agora packs it),
    oneDNN's bf16 GEMM (products rounded to bf16) and MKL's (fp32 products: what --dtype bfloat16 uses)."""
    return {
        "kernel_int8": partial(kernels.linear, x, blocks_i8, "Q8_0", None, True),
        "gemm_fp32": partial(mkl.linear, x, packed, None) if packed is not None else partial(gemm, x, weight, None),
        "gemm_bf16": partial(gemm, x, weight_bf16, None),
        "gemm_bf16_fp32_products": partial(gemm, x, weight_bf16, None, True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x, comma-separated")
    ap.add_argument("--against", metavar="REV", help="also time the fp32 kernel of this git revision")
    ap.add_argument("--lm-head", action="store_true", help="SmolLM2's lm_head (49,152 x 576, Q8_0) instead")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built here")
    against = kernels_at(args.against) if args.against else None
    rng = np.random.default_rng(0)
    rows_out = []
    for n, k in [LM_HEAD] if args.lm_head else SHAPES:
        weight = torch.randn(n, k) * 0.02
        weight_bf16 = weight.to(torch.bfloat16)
        if args.lm_head:
            blocks_i8 = kernels.repack_i8(torch.from_numpy(quantize(weight.numpy(), GGMLQuantizationType.Q8_0)), "Q8_0")
            packed = mkl.pack(weight) if mkl.available() and quant.PACK_GEMM_WEIGHTS else None
        else:
            blocks = q4_1_blocks(n, k, rng)
            blocks_i8 = kernels.repack_i8(blocks, "Q4_1")
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k)
            paths = (
                lm_head_paths(x, blocks_i8, weight, packed, weight_bf16)
                if args.lm_head
                else {  # (this iteration)
                    "kernel_fp32": partial(kernels.linear, x, blocks, "Q4_1", None, False),
                    "kernel_int8": partial(kernels.linear, x, blocks_i8, "Q4_1", None, True),
                    "gemm_fp32": partial(gemm, x, weight, None),
                    "gemm_bf16": partial(gemm, x, weight_bf16, None),  # x rounded to bf16, the product back to fp32
                    **({"against_fp32": partial(against_linear, against, x, blocks)} if against is not None else {}),
                }
            )
            times: dict[str, list[float]] = {name: [] for name in paths}
            for fn in paths.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            row = {
                "shape": [n, k],
                "rows": m,
                **{f"{p}_ms": round(statistics.median(t) * 1e3, 4) for p, t in times.items()},
            }
            if against is not None:
                row["same_as_against"] = bool(torch.equal(paths["kernel_fp32"](), paths["against_fp32"]()))
                row["kernel_over_against"] = round(row["kernel_fp32_ms"] / row["against_fp32_ms"], 3)
                row["kernel_fp32_gflops"] = round(2 * m * n * k / row["kernel_fp32_ms"] / 1e6, 1)
            rows_out.append(row)
            extra = (f"  (kernel {row['kernel_over_against']:.2f}x {args.against}'s time, "
                     f"{'same output' if row['same_as_against'] else 'DIFFERENT output'})" if against else "")  # fmt: skip
            print(f"{n}x{k} rows {m:4d}: " + "  ".join(f"{p} {row[p + '_ms']:.3f}" for p in paths) + " ms" + extra,
                  flush=True)  # fmt: skip
    result = {
        "host": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "against": args.against,
        "rows": rows_out,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
