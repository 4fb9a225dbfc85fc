"""Argument parsing and the driver of `agora bench serve`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from agora.bench import report, workloads
from agora.bench.serve import BenchConfig, compute_metrics, parse_goodput, raw_samples, run_agents, run_requests, send


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("serve", help="load a server and report TTFT, TPOT, ITL, E2E, throughput, goodput",
                        description="Benchmark any OpenAI-compatible server (agora, vLLM, llama.cpp, SGLang).")  # fmt: skip
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name to send")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workload", choices=["random", "shared-prefix", "agent", "agent-repeat"], default="random",
                   help="agent-repeat: coding agents whose answers copy their context (a file rewritten with one "
                        "edit, tool results quoted back); greedy, natural stopping")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (random, shared-prefix)")
    p.add_argument("--input-len", default="128:512", help="prompt words: N or MIN:MAX")
    p.add_argument("--output-len", default=None,
                   help="max tokens: N or MIN:MAX (agent: drawn per turn); default 64:128, agent-repeat 768")  # fmt: skip
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: distinct system prompts")
    p.add_argument("--prefix-len", type=int, default=400, help="shared-prefix: words of each system prompt")
    p.add_argument("--turns", type=int, default=6, help="agent: calls per agent")
    p.add_argument("--system-prompt-len", type=int, default=300, help="agent: words of the shared system prompt")
    p.add_argument("--tool-result-len", type=int, default=100, help="agent: words added each turn")
    p.add_argument("--concurrency", default="8",
                   help="requests in flight (agents, for the agent workloads); a list sweeps: 1,4,16,32, "
                        "each level with prompts of its own")  # fmt: skip
    p.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (vLLM, agora, llama.cpp)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="*", default=None, metavar="SLO", help="SLOs in ms: ttft:500 tpot:50 e2e:5000")
    p.add_argument("--result-json", default=None, help="write every metric and sample here")
    p.add_argument("--plot-dir", default=None, help="write PNG plots here")
    p.add_argument("--report", default=None, metavar="OUT.html",
                   help="write one self-contained HTML page: the table, the plots and the settings")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")


def _specs(args: argparse.Namespace, seed: int) -> list[workloads.RequestSpec]:
    in_len, out_len = workloads.parse_range(args.input_len), workloads.parse_range(args.output_len)
    if args.workload == "random":
        return list(workloads.random_workload(args.num_prompts, in_len, out_len, seed))
    return list(workloads.shared_prefix_workload(args.num_prompts, args.num_groups, args.prefix_len,
                                                 in_len, out_len, seed))  # fmt: skip


def level_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th concurrency level of a sweep: each level sends prompts of its own, so it
    finds neither the prompts of the levels before it in the server's prefix cache nor (greedy) their answers
    in a speculative decoder's cache of recent outputs. The first level keeps ``seed`` itself."""
    return seed + 1_000_003 * index


async def _run(args: argparse.Namespace, cfg: BenchConfig, slos: dict[str, float]) -> list[dict[str, Any]]:
    import httpx

    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise ValueError("--concurrency wants positive integers, e.g. 8 or 1,4,16")
    if args.warmup:
        async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout,
                                     headers={"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}) as c:  # fmt: skip
            warm = list(workloads.random_workload(args.warmup, (16, 32), (8, 8), args.seed + 99))
            results = await asyncio.gather(*(send(c, cfg, s) for s in warm))
            if not any(r.ok for r in results):
                raise RuntimeError(f"every warm-up request failed; first error: {results[0].error}")
    runs = []
    for i, level in enumerate(levels):
        seed = level_seed(args.seed, i)
        if args.workload in ("agent", "agent-repeat"):
            out_len = workloads.parse_range(args.output_len)
            if args.workload == "agent":
                sessions = workloads.agent_sessions(level, args.turns, args.system_prompt_len, 40,
                                                    args.tool_result_len, out_len, seed)  # fmt: skip
            else:
                sessions = workloads.repeat_sessions(level, args.turns, out_len, seed)  # type: ignore[assignment]
            total = level * args.turns
            with tqdm(total=total, desc=f"{args.workload} x{level}", unit="req", file=sys.stderr) as bar:
                results, duration = await run_agents(cfg, sessions, bar)
        else:
            specs = _specs(args, seed)
            with tqdm(total=len(specs), desc=f"{args.workload} c={level}", unit="req", file=sys.stderr) as bar:
                results, duration = await run_requests(cfg, specs, level, args.request_rate, seed, bar)
        metrics = compute_metrics(results, duration, slos)
        label = f"{args.workload}, concurrency {level}" + (f", rate {args.request_rate}/s" if args.request_rate else "")
        print(report.format_table(label, metrics), flush=True)
        runs.append(
            {"label": label, "concurrency": level, "seed": seed, "metrics": metrics, "samples": raw_samples(results)}
        )
    return runs


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the table
    if args.output_len is None:
        args.output_len = "768" if args.workload == "agent-repeat" else "64:128"
    try:
        slos = parse_goodput(args.goodput)
        workloads.parse_range(args.input_len)
        workloads.parse_range(args.output_len)
    except ValueError as exc:
        print(f"agora bench: error: {exc}", file=sys.stderr)
        return 2
    cfg = BenchConfig(args.base_url, args.model, args.api_key, args.ignore_eos, args.temperature, args.timeout)
    try:
        runs = asyncio.run(_run(args, cfg, slos))
    except (ValueError, RuntimeError) as exc:
        print(f"agora bench: error: {exc}", file=sys.stderr)
        return 1
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
    date = time.strftime("%Y-%m-%dT%H:%M:%S")
    if args.result_json:
        report.write_json(args.result_json, {"date": date, "settings": settings, "runs": runs})
    if args.report:
        print(f"wrote {report.write_html(args.report, runs, settings, date, args.plot_dir)}")
    elif args.plot_dir:
        for path in report.write_plots(args.plot_dir, runs):
            print(f"wrote {path}")
    failed = sum(r["metrics"]["failed"] for r in runs)
    total = sum(r["metrics"]["requests"] for r in runs)
    return 1 if failed == total else 0
