"""What speculative decoding costs where its drafts do not pay: the same seeded requests with and without it.

    python benchmarks/spec_overhead.py --out benchmarks/results/spec_overhead.json
    python benchmarks/spec_overhead.py --workload shared-prefix --concurrency 1 --requests 16

Seeded sampling gives the same tokens with speculation on as off (each sequence's noise comes from
its own seed), so both runs do the same work apart from the drafts, and the difference in time is
what speculation adds: its draft rows that were not accepted, its verification steps, the proposer.
A ``agora bench serve`` sweep cannot show a few percent: sampled answers differ in length between
runs. Every configuration runs in a fresh process, alternating within each round, so a slow spell
of the host falls on each; the figures are medians over rounds, and each round's ratio pairs runs
made one after the other. The run checks that every configuration produced the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agora.bench.report import cpu_description

CONFIGS = {"off": None, "suffix": {"method": "suffix"}, "ngram": {"method": "ngram"}}


def worker(args: argparse.Namespace) -> dict:
    from agora import LLM, SamplingParams
    from agora.bench.workloads import parse_range, random_workload, shared_prefix_workload

    spec = CONFIGS[args.config]
    llm = LLM(max_num_seqs=args.concurrency, speculative_config=spec)
    inp, outp = parse_range(args.input_len), parse_range(args.output_len)
    if args.workload == "random":
        reqs = list(random_workload(args.requests, inp, outp, args.seed))
    else:
        reqs = list(shared_prefix_workload(args.requests, 4, 300, inp, outp, args.seed))
    tok = llm.engine.tokenizer
    prompts = [r.prompt if r.prompt is not None else tok.apply_chat_template(r.messages) for r in reqs]
    params = [SamplingParams(temperature=args.temperature, max_tokens=r.max_tokens, ignore_eos=True, seed=i)
              for i, r in enumerate(reqs)]  # fmt: skip
    llm.generate(["warm up"], SamplingParams(temperature=args.temperature, max_tokens=4, seed=0))
    llm.engine.kv.reset_prefix_cache()
    engine = llm.engine
    steps0, secs0 = dict(engine.steps), dict(engine.step_seconds)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = [list(r.outputs[0].token_ids) for r in results]
    out = {
        "config": args.config,
        "wall_s": round(wall, 3),
        "output_tokens": sum(map(len, tokens)),
        "tokens_sha": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
        "steps": {k: engine.steps[k] - steps0[k] for k in engine.steps},
        "step_s": {k: round(engine.step_seconds[k] - secs0[k], 3) for k in engine.step_seconds},
    }
    if spec is not None:
        s = engine.stats().spec
        out["drafts"], out["draft_tokens"], out["accepted"] = s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs", default="off,suffix", help=f"comma-separated, first is the baseline: {sorted(CONFIGS)}"
    )
    ap.add_argument("--workload", choices=["random", "shared-prefix"], default="random")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="sequences decoding together (max_num_seqs)")
    ap.add_argument("--input-len", default="64:256")
    ap.add_argument("--output-len", default="64:256")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1000003)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        print(json.dumps(worker(args)))
        return
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or len(configs) < 2:
        ap.error(f"--configs: two or more of {sorted(CONFIGS)}, got {args.configs!r}")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("workload", "requests", "concurrency",
              "input_len", "output_len", "temperature", "seed")]  # fmt: skip
    for r in range(args.rounds):
        for c in configs:
            cmd = [sys.executable, __file__, *passed, "--config", c]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{c} failed:\n{proc.stderr[-4000:]}")
            runs[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            row = runs[c][-1]
            print(f"round {r + 1} {c:>7}: {row['wall_s']:7.2f} s, {row['output_tokens']} tokens, "
                  f"drafts {row.get('draft_tokens', 0)} ({row.get('accepted', 0)} accepted)", file=sys.stderr, flush=True)  # fmt: skip
    shas = {row["tokens_sha"] for rows in runs.values() for row in rows}
    if len(shas) != 1:
        sys.exit(f"the configurations produced different tokens ({sorted(shas)}): seeded sampling is broken")
    base = configs[0]
    summary = {}
    for c, rows in runs.items():
        decode = [row["step_s"]["decode"] + row["step_s"].get("verify", 0.0) for row in rows]
        summary[c] = {
            "wall_s": statistics.median(row["wall_s"] for row in rows),
            "decode_and_verify_s": round(statistics.median(decode), 3),
            "x_baseline_each_round": [
                round(b["wall_s"] / row["wall_s"], 3) for b, row in zip(runs[base], rows, strict=True)
            ],
            "draft_tokens": rows[0].get("draft_tokens", 0),
            "accepted": rows[0].get("accepted", 0),
            "verify_steps": rows[0]["steps"].get("verify", 0),
        }
        summary[c]["x_baseline"] = statistics.median(summary[c]["x_baseline_each_round"])
    for c, s in summary.items():
        print(f"{c:>7}: {s['wall_s']:7.2f} s (median), x{s['x_baseline']:.3f} of {base} (rounds "
              f"{s['x_baseline_each_round']}), decode+verify steps {s['decode_and_verify_s']:.2f} s, "
              f"{s['draft_tokens']} draft tokens ({s['accepted']} accepted) in {s['verify_steps']} verification steps")  # fmt: skip
    if args.out:
        conf = {k: getattr(args, k) for k in ("workload", "requests", "concurrency", "input_len", "output_len",
                                              "temperature", "seed", "rounds")}  # fmt: skip
        args.out.write_text(json.dumps({"host": cpu_description(), "date": time.strftime("%Y-%m-%d"), **conf,
                                        "summary": summary, "runs": runs}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
