"""What structured outputs cost: decode throughput with a JSON schema on every request against the
same requests unconstrained, at one batch size, engine only (no HTTP), side by side in one process.

    python benchmarks/structured_outputs.py [--batch 16] [--tokens 256] [--repeats 3] [--out FILE]

Three runs per repeat, alternating:
- ``free``: no constraint, ``ignore_eos`` (every request makes exactly ``--tokens`` tokens);
- ``schema-full-budget``: a schema no output can finish inside the budget (an array of at least
  40 records, more than fits), so every request also makes exactly ``--tokens`` tokens while paying for the mask
  on every step and for the ending planner near the end: the cost at a constant batch;
- ``schema-natural``: a small record schema; outputs end when their JSON is whole (fewer tokens,
  so a smaller batch towards the end: reported, not compared), with how many parse.

Reports output tokens/s (median of ``--repeats``) and the constrained/free ratio, with the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from agora import LLM, SamplingParams
from agora.engine.sampling import StructuredOutputsParams

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import host_summary  # noqa: E402

RECORD = {"type": "object", "required": ["name", "city", "age", "skills"], "properties": {
    "name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "skills": {"type": "array", "items": {"type": "string"}}}}  # fmt: skip
FULL = {"type": "object", "required": ["people"], "properties": {
    "people": {"type": "array", "items": RECORD, "minItems": 40}}}  # fmt: skip


def run(llm: LLM, prompts: list, params: SamplingParams) -> tuple[float, list]:
    llm.engine.kv.reset_prefix_cache()
    t0 = time.perf_counter()
    results = llm.chat(prompts, params)
    elapsed = time.perf_counter() - t0
    outs = [r.outputs[0] for r in results]
    return sum(len(o.token_ids) for o in outs) / elapsed, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    llm = LLM(args.model, kv_cache_memory_bytes=1 << 30)
    topics = ["engineers in Berlin", "chefs in Lyon", "pilots in Osaka", "nurses in Lima", "poets in Cork",
              "judges in Accra", "divers in Perth", "bakers in Turin"]  # fmt: skip
    prompts = [[{"role": "user", "content": f"List {3 + i % 5} {topics[i % len(topics)]} as JSON records "
                 f"with name, city, age and skills. ({i})"}] for i in range(args.batch)]  # fmt: skip
    common = dict(max_tokens=args.tokens, temperature=0.8, seed=7)
    configs = {
        "free": SamplingParams(**common, ignore_eos=True),
        "schema-full-budget": SamplingParams(**common, structured_outputs=StructuredOutputsParams(json=json.dumps(FULL))),
        "schema-natural": SamplingParams(**common, structured_outputs=StructuredOutputsParams(
            json=json.dumps({"type": "array", "items": RECORD}))),
    }  # fmt: skip
    run(llm, prompts[:2], SamplingParams(max_tokens=8))  # warm-up (kernels, xgrammar's vocabulary)
    for p in configs.values():
        if p.structured_outputs is not None:
            llm.engine.compile_grammar(p)  # compiled once; the benchmark measures decoding
    rates: dict[str, list[float]] = {k: [] for k in configs}
    lengths: dict[str, list[float]] = {k: [] for k in configs}
    parsed: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(args.repeats):
        for name, params in configs.items():
            rate, outs = run(llm, prompts, params)
            rates[name].append(rate)
            lengths[name].append(statistics.mean(len(o.token_ids) for o in outs))
            ok = 0
            for o in outs:
                try:
                    json.loads(o.text)
                    ok += 1
                except ValueError:
                    pass
            parsed[name].append(ok / len(outs))
            print(
                f"repeat {rep + 1} {name:>18}: {rate:7.1f} tok/s, mean {lengths[name][-1]:.0f} tokens, "
                f"{ok}/{len(outs)} parse",
                flush=True,
            )
    summary = {k: statistics.median(v) for k, v in rates.items()}
    ratio = summary["schema-full-budget"] / summary["free"]
    host = host_summary()
    print(f"\nhost: {host}")
    for k, v in summary.items():
        print(f"{k:>18}: {v:7.1f} output tok/s (median of {args.repeats})")
    print(f"constrained / free at batch {args.batch}, {args.tokens} tokens each: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(sys.argv), "host": host, "model": args.model, "batch": args.batch,
            "tokens": args.tokens, "output_tok_s_median": summary, "runs": rates, "mean_output_tokens": lengths,
            "share_that_parse": parsed, "ratio_constrained_over_free": ratio,
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
