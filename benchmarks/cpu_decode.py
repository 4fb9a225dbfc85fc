"""CPU decode: agora's native kernels against its PyTorch paths, side by side, and their accuracy.

    python benchmarks/cpu_decode.py --batches 1,16,32 --context 600 \
        --out benchmarks/results/cpu_decode.json

Speed: each path runs in its own process, alternating (A B C D E A B C D E ...), on the
default model (SmolLM2-135M-Instruct, Q4_1 GGUF) or ``--model gemma3-270m`` (Q4_K_M: Q4_K,
Q5_0, Q6_K and Q8_0 layers):

- kernels: the native kernels, each decoder layer one native call (the default);
- kernels_fp16_kv, kernels_bf16_kv: the same with ``--kv-cache-dtype float16`` or ``bfloat16``;
- kernels_per_op: the same kernels called op by op from the modules (bit for bit the same numbers);
- bf16_gemms: ``--dtype bfloat16``: bf16 weights for the layers' GEMMs (prefill), fp32
  activations, the decode steps still on the block kernels' fp32 math; a bf16 KV cache;
- int8_activations: ``--gguf-activations int8``: the block kernels quantize their input to
  int8 in blocks of 32 (llama.cpp's numerics), decode and steps up to 64 tokens;
- pytorch: ``AGORA_CPU_KERNELS=0``, PyTorch's fp32 paths only;
- no_qu8: the kernels, but the GGUF formats other than Q8_0 not repacked to QU8 / QU4
  (``agora.models.gguf_repack``): those layers on PyTorch's fp32 GEMM, as before QU8 existed;
- no_qu4: the kernels as before QU4: the 4-bit formats (Q4_0, Q4_K) repacked to QU8 (48 bytes per 32
  weights instead of 24), Q4_1 read as stored;
- q4_1_stored: the kernels, but Q4_1 read as the file stores it (fp16 scale and offset), not as QU4;
- blocks_only: ``--gguf-weights blocks``: the kernels with no fp32 copy of the block layers'
  weights, so prefill steps multiply with the blocks too (the process's peak memory is reported
  for every path, ``rss_peak_mib``);
- int8_blocks_only: both: long steps' GEMM weights dequantized from the int8 kernel's tiles.

Each process starts ``batch`` requests of ``context`` prompt tokens, lets them prefill, then
times decode steps (the figure: the median step over every repeat), then times the prefill
of a fresh ``--prefill``-token prompt. The kernel paths also sum the time each decode step
spends inside the native kernels (``agora.kernels.time_kernels``, clocked in C around every
exported kernel), against which the whole step (scheduler, metadata, dispatch, sampling,
detokenizing) is reported as a ratio.

Accuracy: a fixed text is fed through each path twice, one token a step (the decode path:
block kernels, paged decode attention) and in one prefill step (the GEMMs, in bf16 on the
bf16 path), and compared with the fp32 PyTorch path's decode logits on the same weights (a
process with ``AGORA_CPU_KERNELS=0``, so no kernel at all). Reported: top-1 agreement of
the next-token predictions, the perplexity of the text under each, and the largest logit
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TEXT = (
    "The harbour was quiet before dawn. Fishing boats rocked against the pier while the first gulls "
    "circled the market, where traders stacked crates of ice and argued about the price of mackerel. "
    "A girl on a bicycle delivered bread to the cafe at the corner, and the owner, still half asleep, "
    "counted the loaves twice before he paid her. By seven the sun had cleared the hills, the ferry "
    "sounded its horn, and the town began another ordinary day of work, gossip and salt air. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


@dataclass(frozen=True)
class Setup:
    kernels: str  # AGORA_CPU_KERNELS
    kv_dtype: str = "auto"  # --kv-cache-dtype
    dtype: str = "auto"  # --dtype (bfloat16 on a CPU: bf16 GEMM weights, fp32 activations)
    native: bool = True  # one native call per decoder layer (else the same kernels op by op)
    activations: str = "float32"  # --gguf-activations (int8: llama.cpp's numerics)
    repack: str = "all"  # GGUF formats repacked for the block kernel: "all"; "qu8" (as before QU4); "q4_1" (Q4_1 as
    # stored); "none" (as before QU8: only Q4_1 and Q8_0 on the kernel, the rest on fp32 GEMM)
    weights: str = "fp32"  # --gguf-weights (blocks: no fp32 GEMM weights, every step on the kernels)


PATHS = {
    "kernels": Setup("1"),
    "kernels_fp16_kv": Setup("1", kv_dtype="float16"),
    "kernels_bf16_kv": Setup("1", kv_dtype="bfloat16"),
    "kernels_per_op": Setup("1", native=False),
    "bf16_gemms": Setup("1", dtype="bfloat16"),
    "int8_activations": Setup("1", activations="int8"),
    "pytorch": Setup("0", native=False),
    "no_qu8": Setup("1", repack="none"),
    "no_qu4": Setup("1", repack="qu8"),
    "q4_1_stored": Setup("1", repack="q4_1"),
    "blocks_only": Setup("1", weights="blocks"),
    "int8_blocks_only": Setup("1", activations="int8", weights="blocks"),
}
DEFAULT_PATHS = ("kernels", "kernels_fp16_kv", "kernels_per_op", "bf16_gemms", "int8_activations", "pytorch")
# Paths whose numbers differ from the fp32 PyTorch path's (kernels_per_op computes what kernels does).
ACCURACY_PATHS = ("kernels", "kernels_fp16_kv", "kernels_bf16_kv", "bf16_gemms", "int8_activations", "blocks_only")


def speed_worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from agora import LLM, SamplingParams, kernels

    _set_repack(args)
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(model=args.model, max_num_seqs=max(batches), max_model_len=4096, kv_cache_dtype=args.kv_dtype, dtype=args.dtype,
              gguf_activations=args.gguf_activations, gguf_weights=args.gguf_weights,
              speculative_config=None)  # fmt: skip  # plain decode steps
    engine = llm.engine
    if args.per_op:
        engine.model.model.native = None
    out = {}
    for batch in batches:
        params = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [1 + (i * 131 + j * 7) % 40000 for j in range(args.context)], params)
        while any(r.num_computed_tokens < args.context for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        engine.step()
        times, in_kernels = [], []
        if kernels.available():
            kernels.time_kernels(True)
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
            if kernels.available():
                in_kernels.append(kernels.kernel_seconds())
                kernels.time_kernels(True)  # from zero again
        if kernels.available():
            kernels.time_kernels(False)
            out[f"{batch}_in_kernels"] = statistics.median(in_kernels[:-1] or in_kernels) * 1000
        out[str(batch)] = statistics.median(times[:-1] or times) * 1000
    # Prefill: a fresh prompt of --prefill tokens (nothing cached), the steps until its first token.
    prefill = []
    for i in range(3):
        engine.add_request(f"p{i}", [1 + (i * 977 + j * 13) % 40000 for j in range(args.prefill)],
                           SamplingParams(temperature=0, max_tokens=1))  # fmt: skip
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        prefill.append(time.perf_counter() - start)
    out["prefill"] = statistics.median(prefill) * 1000
    out["threads"] = torch.get_num_threads()
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _set_repack(args: argparse.Namespace) -> None:
    from agora.models import gguf_repack

    if args.repack != "all":  # Q4_1 read as stored, as before QU4
        gguf_repack.AS_STORED = ("Q4_1", *gguf_repack.AS_STORED)
    if args.repack == "none":
        gguf_repack.FORMATS = ()  # the loader then keeps those layers on fp32 GEMM
    elif args.repack == "qu8":
        gguf_repack.FOUR_BIT = ()  # Q4_0 and Q4_K to QU8, as before QU4


def accuracy_worker(args: argparse.Namespace) -> dict[str, int]:
    """Next-token logits over TEXT on this process's path (``AGORA_CPU_KERNELS`` decides whether
    any kernel is used), saved to ``--logits-file``: through the decode path (one token a step:
    the block kernels and the paged decode kernel) and through prefill (the whole text in one
    step: the GEMMs, in bf16 on the bf16 path, and the prefill attention kernel)."""
    import torch

    from agora import kernels
    from agora.engine.attention import AttentionMetadata, TorchPagedAttention, build_group
    from agora.engine.device import pick_kv_dtype, pick_precision
    from agora.engine.tokenizer import Tokenizer
    from agora.models.catalog import resolve_model
    from agora.models.loader import inspect_model, load_model
    from agora.models.quant import GGUFLinear

    _set_repack(args)
    path, _ = resolve_model(args.model)
    files = inspect_model(path)
    ids = Tokenizer(files.tokenizer_dir).encode(TEXT)
    cpu = torch.device("cpu")
    precision = pick_precision(args.dtype, cpu)
    kv_dtype = pick_kv_dtype(args.kv_dtype, precision)
    model = load_model(files, precision.dtype, cpu, gemm_dtype=precision.gemm_dtype,
                       int8_activations=args.gguf_activations == "int8", gguf_weights=args.gguf_weights)  # fmt: skip
    assert any(isinstance(m, GGUFLinear) for m in model.modules()) == kernels.available()
    hkv, d = model.kv_shape
    blocks = -(-len(ids) // 16)
    windows = set(model.layer_sliding_windows)
    table = list(range(blocks))

    def fresh_attention() -> TorchPagedAttention:
        caches = [
            (torch.zeros(blocks + 1, 16, hkv, d, dtype=kv_dtype), torch.zeros(blocks + 1, 16, hkv, d, dtype=kv_dtype))
            for _ in range(model.num_layers)
        ]
        return TorchPagedAttention(caches, model.attention_scale, model.layer_sliding_windows,
                                   bf16=precision.bf16_attention)  # fmt: skip

    def run(attention: TorchPagedAttention, start: int, n: int) -> torch.Tensor:
        group = build_group(None, [n], [start], [table], 16, windows, cpu, paged_kernels=attention.paged_kernels)
        meta = AttentionMetadata(torch.arange(start, start + n), [group])
        hidden = model(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), attention.bind(meta))
        return model.compute_logits(hidden)

    with torch.inference_mode():
        attention = fresh_attention()
        decode = torch.cat([run(attention, pos, 1) for pos in range(len(ids) - 1)])
        prefill = run(fresh_attention(), 0, len(ids) - 1)
    torch.save({"decode": decode, "prefill": prefill, "target": torch.tensor(ids[1:])}, args.logits_file)
    return {"tokens": len(ids) - 1}


def accuracy_of_paths(args: argparse.Namespace) -> dict[str, float]:
    """Each path's logits (computed in its own process), decode and prefill, against the
    PyTorch path's decode logits (fp32 throughout)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in (*ACCURACY_PATHS, "pytorch"):
            run_worker("accuracy", name, args, logits_file=f"{tmp}/{name}.pt")
            runs[name] = torch.load(f"{tmp}/{name}.pt")
    target = runs["pytorch"]["target"]

    def perplexity(x: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(x, target).exp())

    ref = runs["pytorch"]["decode"]
    out: dict[str, float] = {"tokens": len(target), "perplexity_pytorch": perplexity(ref)}
    for name in ACCURACY_PATHS:
        for kind in ("decode", "prefill"):
            a = runs[name][kind]
            out[f"top1_agreement_{name}_{kind}"] = float((a.argmax(-1) == ref.argmax(-1)).float().mean())
            out[f"perplexity_{name}_{kind}"] = perplexity(a)
            out[f"max_abs_logit_diff_{name}_{kind}"] = float((a - ref).abs().max())
    return out


def run_worker(kind: str, path: str, args: argparse.Namespace, logits_file: str = "") -> dict:
    p = PATHS[path]
    env = {**os.environ, "AGORA_CPU_KERNELS": p.kernels, "AGORA_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, __file__, "--worker", kind, "--batches", args.batches, "--context", str(args.context),
           "--steps", str(args.steps), "--prefill", str(args.prefill), "--kv-dtype", p.kv_dtype, "--dtype", p.dtype,
           "--gguf-activations", p.activations, "--gguf-weights", p.weights, "--logits-file", logits_file,
           "--model", args.model]  # fmt: skip
    if not p.native:
        cmd.append("--per-op")
    cmd += ["--repack", p.repack]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from agora.config import DEFAULT_MODEL
    from agora.models.catalog import CATALOG

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=1024, help="tokens of the fresh prompt whose prefill is timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"paths to run, of {', '.join(PATHS)}")
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a packaged model ({', '.join(sorted(CATALOG))}) or a .gguf"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the paths' logits (--no-accuracy: speed only, as for a random-weight model)")  # fmt: skip
    ap.add_argument("--worker", choices=["speed", "accuracy"], help=argparse.SUPPRESS)
    ap.add_argument("--kv-dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-activations", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-weights", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--logits-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--per-op", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repack", default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "speed":
        print(json.dumps(speed_worker(args)))
        return
    if args.worker == "accuracy":
        print(json.dumps(accuracy_worker(args)))
        return
    from agora import envs
    from agora.bench.report import cpu_description

    host = cpu_description()
    isa = envs.cpu_isa()  # the kernels' build (AGORA_CPU_ISA=avx2: an AVX2 host's paths on this CPU)
    if isa != "native":
        host += f"; kernels built for {isa}"
    paths = args.paths.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_worker("speed", name, args))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    batches = args.batches.split(",")
    table: dict[str, dict[str, float]] = {}
    print(f"decode step, median ms (context {args.context}, {args.repeats} alternating runs per path; {host})")
    print(f"{'batch':>5} " + " ".join(f"{name:>15}" for name in paths))
    for b in batches:
        table[b] = {f"{name}_ms": median(name, b) for name in paths}
        table[b].update({f"{name}_tok_s": int(b) * 1000 / table[b][f"{name}_ms"] for name in paths})
        print(f"{b:>5} " + " ".join(f"{table[b][f'{name}_ms']:>15.1f}" for name in paths))
    if "pytorch" in paths:
        for b in batches:
            for name in paths:
                table[b][f"{name}_speedup_over_pytorch"] = table[b]["pytorch_ms"] / table[b][f"{name}_ms"]
    print("time inside the native kernels per step, and the whole step over it:")
    for b in batches:
        for name in (n for n in paths if PATHS[n].kernels == "1"):
            inside = median(name, f"{b}_in_kernels")
            table[b][f"{name}_in_kernels_ms"] = inside
            table[b][f"{name}_step_over_kernels"] = table[b][f"{name}_ms"] / inside
            print(f"{b:>5} {name:>15}: {inside:.2f} ms in kernels, step {table[b][f'{name}_step_over_kernels']:.3f}x")
    prefill = {name: median(name, "prefill") for name in paths}
    print(f"prefill of a fresh {args.prefill}-token prompt, median ms: "
          + ", ".join(f"{name} {ms:.0f}" for name, ms in prefill.items()))  # fmt: skip
    print("peak memory of the process, median MiB: "
          + ", ".join(f"{name} {median(name, 'rss_peak_mib'):.0f}" for name in paths))  # fmt: skip
    accuracy = accuracy_of_paths(args) if args.accuracy else {}
    if accuracy:
        print(
            f"accuracy over {accuracy['tokens']} tokens against the fp32 PyTorch path's decode logits "
            f"(perplexity {accuracy['perplexity_pytorch']:.3f}):"
        )
    for name in ACCURACY_PATHS if accuracy else ():
        for kind in ("decode", "prefill"):
            key = f"{name}_{kind}"
            print(f"  {key:>24}: top-1 agreement {accuracy[f'top1_agreement_{key}']:.1%}, perplexity "
                  f"{accuracy[f'perplexity_{key}']:.3f}, max |logit diff| {accuracy[f'max_abs_logit_diff_{key}']:.2e}")  # fmt: skip
    if args.out:
        result = {"command": " ".join(["python", *sys.argv]), "host": host, "kernels_isa": isa, "context": args.context,
                  "decode": table, "prefill_ms": prefill, "accuracy": accuracy, "runs": runs}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
