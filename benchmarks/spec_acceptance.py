"""What speculative decoding gains or costs at a given draft acceptance, on this device.

How often drafts are accepted is a matter of the model and the workload; what a verified draft
costs is a matter of the device. This benchmark fixes the first and measures the second. An oracle
proposer knows each request's greedy continuation (from the run without drafts) and drafts
``--draft-len`` tokens, each right with probability ``alpha`` as long as every one before it was (so
each draft position is accepted with probability alpha); a request whose output has left the
reference gets no drafts. The engine's draft policy runs as it does in service: it measures the
step costs and trims drafts by the acceptance it sees. Greedy, ``ignore_eos``, the same requests for
every configuration; each configuration runs in its own process, in turn within each round (each
round starting one configuration later, so none always follows the same one), and
runs the whole workload once untimed first (the policy's cost line, and on a GPU the CUDA graphs of
every step shape), then again timed with the prefix cache emptied.

    python benchmarks/spec_acceptance.py --out benchmarks/results/spec_acceptance_cpu.json
    python benchmarks/spec_acceptance.py --device cuda --shape smollm2-135m --dtype bfloat16 \\
        --concurrency 1,16,64 --out benchmarks/results/spec_acceptance_h100.json

``--shape`` builds random weights in a model's shape (the GPU machines cannot fetch the packaged
models; speed does not depend on the values); without it the packaged default model runs. Reported
per concurrency: output tok/s of each configuration, its ratio to speculation off (median of
same-round ratios), drafts proposed and accepted, and whether its tokens were those of the run
without drafts (exact fp32 math gives the same tokens; other numerics may not, see the README).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agora.bench.report import cpu_description


class OracleProposer:
    """Drafts from the reference continuation: position i right with probability alpha if all before were."""

    def __init__(
        self, prompts: list[list[int]], outputs: list[list[int]], alpha: float, max_drafts: int, seed: int
    ) -> None:
        self.prompt_len = len(prompts[0])
        self.refs = {tuple(p): (i, o) for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))}
        self.alpha = alpha
        self.max_drafts = max_drafts
        self.seed = seed

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int, salt: str | None = None) -> list[int]:
        index, ref = self.refs[tuple(token_ids[: self.prompt_len])]
        done = len(token_ids) - self.prompt_len
        if token_ids[self.prompt_len :] != ref[:done]:
            return []  # the output left the reference: nothing is known about what follows
        truth = ref[done : done + min(max_tokens, self.max_drafts)]
        rng = random.Random(f"{self.seed}/{index}/{done}")
        right = 0
        while right < len(truth) and rng.random() < self.alpha:
            right += 1
        return truth[:right] + [t + 1 for t in truth[right:]]  # t + 1: a token the model did not pick

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, salt: str | None = None) -> None:
        pass


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    n = max(args.requests_per_seq * args.concurrency, 2)
    return [[rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)] for _ in range(n)]


def worker(args: argparse.Namespace) -> dict:
    from agora import LLM, SamplingParams

    alpha = None if args.config == "off" else float(args.config)
    spec = None if alpha is None else {"method": "ngram", "num_speculative_tokens": args.draft_len}
    from agora.config import DEFAULT_MODEL

    llm = LLM(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, max_num_seqs=args.concurrency,
              max_model_len=args.prompt_len + args.output_len + 64, enforce_eager=args.enforce_eager,
              speculative_config=spec)  # fmt: skip
    engine = llm.engine
    prompts = workload(args, engine.vocab_size)
    if alpha is not None:
        reference = json.loads(Path(args.reference).read_text())
        engine.proposer = OracleProposer(prompts, reference, alpha, args.draft_len, args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # untimed: the policy's step costs, the CUDA graphs
    engine.kv.reset_prefix_cache()
    spec0 = engine.stats().spec
    steps0 = dict(engine.steps)
    sync = _synchronize(args.device)
    sync()
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - start
    tokens = [list(r.outputs[0].token_ids) for r in results]
    if args.reference and alpha is None and not Path(args.reference).exists():
        Path(args.reference).write_text(json.dumps(tokens))
    out = {
        "config": args.config,
        "wall_s": round(wall, 4),
        "output_tokens": sum(map(len, tokens)),
        "tok_s": round(sum(map(len, tokens)) / wall, 2),
        "steps": {k: engine.steps[k] - steps0.get(k, 0) for k in engine.steps},
    }
    if args.reference and Path(args.reference).exists():
        out["tokens_match_off"] = tokens == json.loads(Path(args.reference).read_text())
    if alpha is not None:
        s = engine.stats().spec
        out["draft_tokens"] = s.num_draft_tokens - spec0.num_draft_tokens
        out["accepted"] = s.num_accepted_tokens - spec0.num_accepted_tokens
    return out


def _synchronize(device: str):  # noqa: ANN202
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return cpu_description()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="a model path or catalog name (default: the packaged default)")
    ap.add_argument("--shape", default=None, help="random weights in this shape: one of benchmarks/gpu_decode.py's")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated: sequences decoding together")
    ap.add_argument("--requests-per-seq", type=int, default=2, help="requests = this x the concurrency")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--alphas", default="0,0.5,0.8,0.95", help="per-position acceptance of the oracle's drafts")
    ap.add_argument("--draft-len", type=int, default=8, help="drafts the oracle offers a step (before the policy)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        args.concurrency = int(args.concurrency)
        print(json.dumps(worker(args)))
        return
    configs = ["off", *args.alphas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from gpu_decode import SHAPES, build

            model_type, cfg = SHAPES[args.shape]
            build(tmp, model_type, cfg)
            args.model = tmp
        passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("device", "dtype", "prompt_len",
                  "output_len", "draft_len", "seed", "requests_per_seq")]  # fmt: skip
        passed += [f"--model={args.model}"] if args.model else []
        passed += ["--enforce-eager"] if args.enforce_eager else []
        summary: dict[str, dict] = {}
        runs: dict[str, dict[str, list[dict]]] = {}
        for c in args.concurrency.split(","):
            reference = f"{tmp}/reference-{c}.json"
            runs[c] = {k: [] for k in configs}
            for r in range(args.rounds):
                # off first in round 1 (its tokens are the oracle's reference), then each round starts one later
                for k in configs[r % len(configs) :] + configs[: r % len(configs)]:
                    cmd = [sys.executable, __file__, *passed, f"--concurrency={c}", f"--config={k}",
                           f"--reference={reference}"]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{k} at concurrency {c} failed:\n{proc.stderr[-4000:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[c][k].append(row)
                    print(f"concurrency {c} round {r + 1} {k:>5}: {row['tok_s']:8.1f} tok/s, drafts "
                          f"{row.get('draft_tokens', 0)} ({row.get('accepted', 0)} accepted), "
                          f"tokens as without drafts: {row.get('tokens_match_off')}", file=sys.stderr, flush=True)  # fmt: skip
            summary[c] = {}
            for k, rows in runs[c].items():
                ratios = [row["tok_s"] / b["tok_s"] for b, row in zip(runs[c]["off"], rows, strict=True)]
                summary[c][k] = {
                    "tok_s": statistics.median(row["tok_s"] for row in rows),
                    "x_off": round(statistics.median(ratios), 3),
                    "x_off_each_round": [round(x, 3) for x in ratios],
                    "draft_tokens": rows[-1].get("draft_tokens", 0),
                    "accepted": rows[-1].get("accepted", 0),
                    "tokens_match_off": all(row.get("tokens_match_off", True) for row in rows),
                }
                s = summary[c][k]
                print(f"concurrency {c:>3} {k:>5}: {s['tok_s']:8.1f} tok/s, x{s['x_off']:.3f} of off "
                      f"{s['x_off_each_round']}, {s['accepted']}/{s['draft_tokens']} drafts accepted", flush=True)  # fmt: skip
    if args.out:
        conf = {k: getattr(args, k) for k in ("device", "dtype", "model", "shape", "prompt_len", "output_len",
                                              "requests_per_seq", "draft_len", "enforce_eager", "seed", "rounds")}  # fmt: skip
        args.out.write_text(json.dumps({"host": cpu_description(), "device": device_description(args.device),
                                        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), **conf,
                                        "summary": summary, "runs": runs}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
