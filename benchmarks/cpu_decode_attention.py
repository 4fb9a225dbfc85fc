"""CPU decode attention: the paged kernel with and without its software prefetch, side by side.

    python benchmarks/cpu_decode_attention.py --out benchmarks/results/cpu_decode_attention.json

Decode attention reads every cached K/V row of every request once per step, so it should run
at memory bandwidth. The kernel source is built twice, as the engine builds it and with
``-DAGORA_NO_PREFETCH``; both run alternately in one process over the same caches:
SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64, 16-token blocks in random
order), one cache per layer for all 30 layers so that every step reads cold memory. The
figure is the median of ``--repeats`` steps; GB/s counts the K and V bytes a step must read.
Beside them runs a bare read of the same K and V rows in the same order (``scattered_read.c``: no arithmetic,
no prefetch), the floor under the kernel's time on this host (``bare_read``, ``kernel_over_bare_read``).
``--against REV`` also builds the kernel of that git revision (as the engine would) and runs it beside them
(``over_against``: this tree's time over its; ``max_abs_diff_against``: how far apart their outputs are), on
the cases its kernel reads (no bf16 cache before it had one). With ``AGORA_CPU_ISA=avx2`` in the environment all
of them are built for AVX2, FMA and F16C only, as on an AMD Zen 3 host, so that path can be timed on a CPU with
AVX-512 too (``built_for``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from kernels_at import attention_kernel, build, kernels_at

from agora import envs, kernels

# (requests, context tokens per request, KV cache dtype)
CASES = [
    (32, 1000, torch.float32),  # 32 agents mid-session
    (32, 1000, torch.float16),
    (32, 1000, torch.bfloat16),
    (16, 1400, torch.bfloat16),  # 16 agents at --dtype bfloat16 (a bf16 cache)
    (16, 1400, torch.float32),
    (4, 4000, torch.float32),
    (1, 8000, torch.float32),  # one long-context agent
]
LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 30, 9, 3, 64, 16


def measure(libs: dict[str, ctypes.CDLL], batch: int, context: int, dtype: torch.dtype, repeats: int) -> dict:
    per_req = -(-context // BLOCK)
    caches = [
        (torch.randn(batch * per_req + 1, BLOCK, KV_HEADS, DIM).to(dtype), torch.randn(batch * per_req + 1, BLOCK, KV_HEADS, DIM).to(dtype))
        for _ in range(LAYERS)
    ]  # fmt: skip
    tables = torch.randperm(batch * per_req).view(batch, per_req).contiguous()
    seq_lens = torch.full((batch,), context, dtype=torch.int64)
    q = torch.randn(batch, HEADS, DIM)
    threads = torch.get_num_threads()
    kernel = "agora_paged_decode_attention"
    kernel_libs = {label: lib for label, lib in libs.items() if label != "bare_read"}
    fns = {label: fn for label, lib in kernel_libs.items() if (fn := attention_kernel(lib, kernel, dtype)) is not None}
    if "bare_read" in libs:  # the same arguments; it reads the K and V rows and nothing else
        read = libs["bare_read"].agora_bench_scattered_read
        read.argtypes, read.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6, ctypes.c_float
        row_bytes = KV_HEADS * DIM * caches[0][0].element_size()
        fns["bare_read"] = lambda q, k, v, tables, per_req, seq_lens, batch, *rest: read(
            k, v, tables, batch, per_req, context, BLOCK, row_bytes, threads
        )  # fmt: skip
    times: dict[str, list[float]] = {n: [] for n in fns}
    outs = {}
    for _ in range(repeats + 1):
        for label, fn in fns.items():
            out = torch.empty_like(q)
            start = time.perf_counter()
            for k, v in caches:
                fn(
                    q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), per_req, seq_lens.data_ptr(),
                    batch, HEADS, KV_HEADS, DIM, BLOCK, 0, DIM**-0.5, out.data_ptr(), threads,
                )  # fmt: skip
            times[label].append(time.perf_counter() - start)
            outs[label] = out
    step_bytes = LAYERS * batch * context * KV_HEADS * DIM * 2 * caches[0][0].element_size()
    result: dict = {"requests": batch, "context": context, "kv_dtype": str(dtype).removeprefix("torch.")}
    for label in fns:
        ms = statistics.median(times[label][1:]) * 1000
        result[label] = {"step_ms": round(ms, 2), "GB_per_s": round(step_bytes / ms / 1e6, 1)}
    if "bare_read" in result:
        result["kernel_over_bare_read"] = round(result["prefetch"]["step_ms"] / result["bare_read"]["step_ms"], 2)
    result["speedup"] = round(result["no_prefetch"]["step_ms"] / result["prefetch"]["step_ms"], 2)
    result["max_abs_diff"] = (outs["prefetch"] - outs["no_prefetch"]).abs().max().item()
    if "against" in fns:
        result["over_against"] = round(result["prefetch"]["step_ms"] / result["against"]["step_ms"], 2)
        result["max_abs_diff_against"] = (outs["prefetch"] - outs["against"]).abs().max().item()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--against", metavar="REV", help="also time the kernel of this git revision")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.peers.compare import host_summary, memory_bandwidth

    bandwidth = memory_bandwidth()
    print(
        f"{host_summary()}; a bare read of 256 MB runs at {bandwidth / 1e9:.1f} GB/s here; kernels built for "
        + {"native": "this host", "avx2": "AVX2 only", "generic": "no SIMD"}[envs.cpu_isa()]
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        libs = {
            "prefetch": build(kernels.SOURCE, out / "kernels.so"),
            "no_prefetch": build(kernels.SOURCE, out / "kernels-np.so", defines=("AGORA_NO_PREFETCH",)),
            "bare_read": build(Path(__file__).with_name("scattered_read.c"), out / "read.so"),
        }
        if args.against:
            libs["against"] = kernels_at(args.against)
        results = []
        for batch, context, dtype in CASES:
            r = measure(libs, batch, context, dtype, args.repeats)
            results.append(r)
            print(
                f"{batch:3d} requests x {context:5d} tokens, {r['kv_dtype']:8s}: "
                f"{r['prefetch']['step_ms']:7.1f} ms ({r['prefetch']['GB_per_s']:5.1f} GB/s) with prefetch, "
                f"{r['no_prefetch']['step_ms']:7.1f} ms ({r['no_prefetch']['GB_per_s']:5.1f} GB/s) without: "
                f"{r['speedup']:.2f}x; a bare read of the same rows {r['bare_read']['step_ms']:.1f} ms "
                f"({r['bare_read']['GB_per_s']:.1f} GB/s, the kernel {r['kernel_over_bare_read']:.2f}x its time)"
                + (
                    f"; {args.against}: {r['against']['step_ms']:.1f} ms ({r['over_against']:.2f}x)"
                    if "against" in r
                    else ""
                )
            )
    if args.out:
        report = {
            "command": "python " + " ".join(sys.argv),
            "host": host_summary(),
            "built_for": envs.cpu_isa(),
            "read_bandwidth_GB_per_s": round(bandwidth / 1e9, 1),
            "threads": torch.get_num_threads(),
            "layers": LAYERS,
            "cases": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
