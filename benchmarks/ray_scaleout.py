"""`agora serve --ray` against `agora serve --replicas` on this machine: what Ray costs.

    python benchmarks/ray_scaleout.py --out benchmarks/results/ray_scaleout.json

Both runs put two SmolLM2 engine replicas (one core each) behind agora's gateway with the
prefix-aware profile; with ``--ray`` Ray Serve places and supervises them (a local Ray
instance, loopback only), without it agora's own supervisor does. For each, in alternating
rounds: the added latency per request (sequential one-token requests: gateway + replica path,
p50 of the end-to-end time), then the agent workload (`agora bench serve --workload agent`:
throughput, TTFT, E2E) with the gateway's prefix hit ratio. Ratios are ray / plain, measured in
one run; the host is recorded.
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

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from compare import host_summary  # noqa: E402

from agora.router.replicas import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AGORA = os.environ.get("AGORA", str(ROOT / ".venv" / "bin" / "agora"))
MODEL = "SmolLM2-135M-Instruct"


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))  # fmt: skip


def _start(mode: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [AGORA, "serve", "--replicas", "2", "--port", str(port), "--router-profile", "prefix-aware"]
    if mode == "ray":
        cmd += ["--ray", "--num-cpus-per-replica", "1"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "AGORA_NUM_THREADS": "1"})  # fmt: skip


def _wait(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            if _metric(httpx.get(f"{url}/metrics", timeout=2).text, "agora_gateway_endpoint_healthy") >= 2:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not come up; see {log}")
        time.sleep(1)


def _probe(url: str, n: int) -> dict:
    """p50/p90 of sequential one-token requests (distinct short prompts: nothing to wait for but the path)."""
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(n + 5):
            body = {"model": MODEL, "prompt": f"probe {i}", "max_tokens": 1, "temperature": 0}
            t = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json=body)
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 5:  # warm-up
                times.append(dt * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "n": n}


def run(mode: str, args: argparse.Namespace, out: Path, round_: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out.parent / f"{out.stem}.{mode}.{round_}.log"
    proc = _start(mode, port, log)
    try:
        _wait(url, proc, log)
        time.sleep(args.settle)  # let start-up work (Ray's prestarted workers, kernel loads) finish first
        probe = _probe(url, args.probes)
        before = httpx.get(f"{url}/metrics", timeout=5).text
        result = out.parent / f"{out.stem}.{mode}.{round_}.bench.json"
        subprocess.run([AGORA, "bench", "serve", "--base-url", url, "--model", MODEL, "--workload", "agent",
                        "--concurrency", str(args.concurrency), "--turns", str(args.turns), "--output-len",
                        args.output_len, "--ignore-eos", "--seed", str(args.seed), "--result-json", str(result)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        after = httpx.get(f"{url}/metrics", timeout=5).text
        m = json.loads(result.read_text())["runs"][0]["metrics"]
        result.unlink()
        hit = _metric(after, "agora_gateway_prefix_blocks_hit_total") - _metric(
            before, "agora_gateway_prefix_blocks_hit_total"
        )
        asked = _metric(after, "agora_gateway_prefix_blocks_queried_total") - _metric(
            before, "agora_gateway_prefix_blocks_queried_total")  # fmt: skip
        return {"mode": mode, "round": round_, "probe": probe, "output_throughput": m["output_throughput"],
                "ttft_p50_ms": m["ttft_ms"]["median"], "e2e_p50_ms": m["e2e_ms"]["median"], "failed": m["failed"],
                "completed": m["completed"], "prefix_hit_ratio": hit / asked if asked else None}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="alternating plain/ray rounds; medians are reported")
    p.add_argument("--probes", type=int, default=50)
    p.add_argument("--settle", type=float, default=10.0, help="seconds of idle after the replicas are up")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--output-len", default="16:80")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/ray_scaleout.json")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(args.rounds):
        for mode in ("plain", "ray"):
            runs.append(run(mode, args, out, r))
            print(json.dumps(runs[-1]), flush=True)

    def paired(f) -> float:  # noqa: ANN001 - the median over rounds of each round's ray-vs-plain figure
        pairs = [
            (a, b)
            for a in runs
            for b in runs
            if a["mode"] == "ray" and b["mode"] == "plain" and a["round"] == b["round"]
        ]
        return statistics.median(f(a, b) for a, b in pairs)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    # The host's speed drifts by more than Ray costs over minutes (one-token requests at idle moved between
    # 33 and 52 ms in either mode): each round compares runs minutes apart, and the medians are over rounds.
    summary = {
        "throughput_ratio_ray_vs_plain": paired(lambda a, b: a["output_throughput"] / b["output_throughput"]),
        "added_p50_ms_per_request": paired(lambda a, b: a["probe"]["p50_ms"] - b["probe"]["p50_ms"]),
        "agent_e2e_p50_ratio": paired(lambda a, b: a["e2e_p50_ms"] / b["e2e_p50_ms"]),
        "prefix_hit_ratio_ray": med("ray", "prefix_hit_ratio"),
        "prefix_hit_ratio_plain": med("plain", "prefix_hit_ratio"),
        "failed": sum(x["failed"] for x in runs),
    }
    report = {"benchmark": "ray_scaleout", "host": host_summary(), "model": MODEL,
              "command": " ".join(["python benchmarks/ray_scaleout.py", *sys.argv[1:]]),
              "workload": f"agent, {args.concurrency} agents x {args.turns} turns, {args.output_len} tokens/turn",
              "summary": summary, "runs": runs}  # fmt: skip
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
