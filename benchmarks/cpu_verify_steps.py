"""What a speculative verification step costs on the CPU: runner time per step against the rows it computes.

    python benchmarks/cpu_verify_steps.py --out benchmarks/results/cpu_verify_steps.json
    python benchmarks/cpu_verify_steps.py --max-kernel-rows 64,192 --rounds 3   # row limits, alternating

The packaged SmolLM2 (GGUF, exact fp32 math). ``--batches`` sequences are prefilled with ``--context``
tokens each, then every step verifies ``d`` draft tokens per sequence for each ``d`` of ``--drafts``
(forced drafts: the last token repeated, so the cost is measured whatever the acceptance). A step
computes ``batch * (1 + d)`` rows; the figure is the median runner time over ``--steps`` such steps,
and ``ms_per_row`` what one row cost. Where an extra row costs about what a decode row does, drafts
pay only by their acceptance; where it costs less, verification is cheaper than decoding.

Each ``--max-kernel-rows`` value runs in its own process (the limit is read when the model loads):
steps of more rows than the limit take PyTorch's GEMM on the dequantized fp32 weights. ``--pack-gemm on,off``
runs each limit with the fp32 GEMM weights packed once for MKL (``agora.kernels.mkl``) and without, whatever
agora does on this CPU by default (it packs on Intel only); with packing the limit given is the one against
packed weights (``MAX_KERNEL_ROWS_PACKED_GEMM``).

    python benchmarks/cpu_verify_steps.py --batches 8,16 --drafts 4,6,8 --max-kernel-rows 48,192 --pack-gemm on,off

``--against REV`` times a kernel change in whole steps: ``agora/kernels/cpu.c`` as of that git revision is built
(``kernels_at``) and the engine's steps alternate between it and today's kernels (A B B A ...), in one process over
the same sequences, so the host's drifts fall on both; each cell then has ``ms_against`` (REV's median) and
``over_against``. REV must be recent enough to share today's kernel structs (the native decoder layer's).

    python benchmarks/cpu_verify_steps.py --batches 1,16 --drafts 0,4,8,9,16 --steps 20 --against HEAD
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agora.bench.report import cpu_description


def worker(args: argparse.Namespace) -> list[dict]:
    from agora import LLM, SamplingParams, kernels
    from agora.models import quant

    if args.pack_gemm:
        quant.PACK_GEMM_WEIGHTS = args.pack_gemm == "on"
    if args.max_kernel_rows and args.dtype == "bfloat16":  # the limit against bf16 GEMM weights
        quant.MAX_KERNEL_ROWS_BF16_GEMM = int(args.max_kernel_rows)
    elif args.max_kernel_rows and quant.PACK_GEMM_WEIGHTS:
        quant.MAX_KERNEL_ROWS_PACKED_GEMM = int(args.max_kernel_rows)
    elif args.max_kernel_rows:
        quant.MAX_KERNEL_ROWS = int(args.max_kernel_rows)
    batches = [int(b) for b in args.batches.split(",")]
    ours = kernels.lib()
    against = None
    if args.against:
        from kernels_at import kernels_at

        against = kernels_at(args.against)
    llm = LLM(max_num_seqs=max(batches), max_model_len=4096, speculative_config={"method": "suffix"},
              dtype=args.dtype, gguf_activations=args.gguf_activations, kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    engine = llm.engine
    drafts = {"d": 0}
    engine._drafts = lambda req: [req.output_token_ids[-1]] * drafts["d"]  # forced: cost whatever is accepted
    seen: list[tuple[int, int, float]] = []
    execute = engine.runner.execute

    def timed(out):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        result = execute(out)
        seen.append((len(out.scheduled), out.total_tokens, time.perf_counter() - start))
        return result

    engine.runner.execute = timed
    rows = []
    for batch in batches:
        drafts["d"] = 0
        for i in range(batch):
            prompt = [1 + (i * 131 + j * 7) % 40000 for j in range(args.context)]
            engine.add_request(
                f"b{batch}-{i}", prompt, SamplingParams(temperature=0, max_tokens=4096 - args.context, ignore_eos=True)
            )
        while engine.scheduler.waiting or any(r.num_computed_tokens < args.context for r in engine.scheduler.running):
            engine.step()
        for d in (int(x) for x in args.drafts.split(",")):
            drafts["d"] = d
            engine.step()  # the step after which every sequence has d drafts
            times: dict[bool, list[float]] = {False: [], True: []}  # by whether REV's kernels ran the step
            for i in range(args.steps * (2 if against else 1)):
                theirs = against is not None and i % 4 in (1, 2)
                if against is not None:  # (every kernel call looks the library up anew)
                    kernels._lib = against if theirs else ours
                seen.clear()
                engine.step()
                times[theirs] += [t for n, total, t in seen if n == batch and total == batch * (1 + d)]
            if against is not None:
                kernels._lib = ours
            ms = statistics.median(times[False]) * 1000
            rows.append({"batch": batch, "drafts": d, "rows": batch * (1 + d), "steps": len(times[False]),
                         "ms": round(ms, 2), "ms_per_row": round(ms / (batch * (1 + d)), 3)})  # fmt: skip
            if against is not None:
                ms_against = statistics.median(times[True]) * 1000
                rows[-1].update(ms_against=round(ms_against, 2), over_against=round(ms / ms_against, 3))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for i in range(batch):
            engine.abort_request(f"b{batch}-{i}")
        while engine.has_unfinished_requests():
            engine.step()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--drafts", default="0,1,2,4,6,8")
    ap.add_argument("--context", type=int, default=1400)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each limit, alternating; cells are medians")
    ap.add_argument("--max-kernel-rows", default="", help="comma-separated limits to compare (default: agora's)")
    ap.add_argument("--pack-gemm", default="", help="on,off: each limit with and without MKL-packed GEMM weights")
    ap.add_argument(
        "--dtype", default="float32", help="bfloat16: GEMM weights in bf16 (--max-kernel-rows sets their limit)"
    )
    ap.add_argument("--gguf-activations", default="float32", help="int8: the block kernels' int8-activation path")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--against", metavar="REV", help="also time every step on the kernels of this git revision")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not set(filter(None, args.pack_gemm.split(","))) <= {"on", "off"}:
        ap.error(f"--pack-gemm takes on, off or both (on,off), not {args.pack_gemm!r}")
    runs: dict[str, list[list[dict]]] = {}
    for _ in range(args.rounds):  # the limits alternate, so a slow spell of the host falls on each
        for limit, pack in itertools.product(
            args.max_kernel_rows.split(",") if args.max_kernel_rows else [""],
            args.pack_gemm.split(",") if args.pack_gemm else [""],
        ):
            cmd = [sys.executable, __file__, "--worker", "--batches", args.batches, "--drafts", args.drafts,
                   "--context", str(args.context), "--steps", str(args.steps), "--max-kernel-rows", limit,
                   "--pack-gemm", pack,
                   "--dtype", args.dtype, "--gguf-activations", args.gguf_activations, "--kv-cache-dtype", args.kv_cache_dtype,
                   *(["--against", args.against] if args.against else [])]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            name = " ".join(filter(None, [limit or "default", pack and f"packed {pack}"]))
            runs.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for limit, rounds in runs.items():  # per cell, the median over rounds
        results[limit] = [
            {**cells[0], "ms": round(statistics.median(c["ms"] for c in cells), 2),
             "ms_per_row": round(statistics.median(c["ms_per_row"] for c in cells), 3),
             "ms_each_round": [c["ms"] for c in cells],
             **({"ms_against": round(statistics.median(c["ms_against"] for c in cells), 2),
                 "over_against": round(statistics.median(c["over_against"] for c in cells), 3),
                 "over_against_each_round": [c["over_against"] for c in cells]} if args.against else {})}
            for cells in zip(*rounds, strict=True)
        ]  # fmt: skip
    for limit, rows in results.items():
        print(f"max kernel rows {limit}:")
        for r in rows:
            versus = f", {r['over_against']:.3f}x {args.against}'s {r['ms_against']:.1f} ms" if args.against else ""
            print(f"  {r['batch']:>2} sequences x (1 + {r['drafts']}) = {r['rows']:>3} rows: {r['ms']:7.1f} ms a step, "
                  f"{r['ms_per_row']:.2f} ms a row{versus}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"host": cpu_description(), "date": time.strftime("%Y-%m-%d"),
                                        "context": args.context, "rounds": args.rounds, "against": args.against,
                                        "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
