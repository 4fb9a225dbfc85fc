"""Gateway profiles side by side: `agora serve --replicas 2` with each profile, agent workload.

    python benchmarks/gateway_profiles.py --profiles prefix-aware,round-robin --concurrency 16 \
        --out benchmarks/results/gateway

For each profile, starts two engine replicas and the gateway (each replica gets one
of the two cores), waits until both replicas are healthy, runs `agora bench serve
--workload agent` through the gateway, and stops everything before the next
profile. Writes one JSON per profile and comparison.md with ratios against the
last profile listed (the baseline).
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

from agora.router.replicas import free_port

ROOT = Path(__file__).resolve().parent.parent
AGORA = os.environ.get("AGORA", str(ROOT / ".venv" / "bin" / "agora"))
MODEL = "SmolLM2-135M-Instruct"


def healthy_replicas(url: str) -> int:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("agora_gateway_endpoint_healthy{"))  # fmt: skip


def run_profile(profile: str, args: argparse.Namespace, out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / f"{profile}.server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([AGORA, "serve", "--replicas", str(args.replicas), "--router-profile", profile,
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while healthy_replicas(url) < args.replicas:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not come up; see {log.name}")
            time.sleep(1)
        result = out / f"{profile}.json"
        cmd = [AGORA, "bench", "serve", "--base-url", url, "--model", MODEL, "--workload", "agent",
               "--concurrency", str(args.concurrency), "--turns", str(args.turns), "--output-len", str(args.output_len),
               "--ignore-eos", "--seed", str(args.seed), "--result-json", str(result)]  # fmt: skip
        print(f"== {profile}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        data = json.loads(result.read_text())
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        data["gateway_metrics"] = [line for line in metrics.splitlines() if line.startswith("agora_gateway_")
                                   and not line.startswith("agora_gateway_pick_seconds_bucket")]  # fmt: skip
        result.write_text(json.dumps(data, indent=1) + "\n")
        return data["runs"][0]["metrics"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default="prefix-aware,round-robin", help="the last one is the baseline")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16, help="agents")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--output-len", default="16:80",
                   help="tokens per turn, N or MIN:MAX drawn per turn (real agents drift apart; lock-step "
                        "agents make round-robin accidentally sticky)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/gateway")
    p.add_argument("--table-only", action="store_true", help="rebuild comparison.md from the JSON files in --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    if args.table_only:
        results = {name: json.loads((out / f"{name}.json").read_text())["runs"][0]["metrics"] for name in profiles}
    else:
        results = {name: run_profile(name, args, out) for name in profiles}
    base = results[profiles[-1]]
    command = " ".join(["python benchmarks/gateway_profiles.py", *(a for a in sys.argv[1:] if a != "--table-only")])
    rows = [f"Command: {command}", "",
            f"Agent workload through `agora serve --replicas {args.replicas}`: {args.concurrency} agents x "
            f"{args.turns} turns, {args.output_len} output tokens per turn (ignore_eos), {MODEL}, this machine.",
            "", "| profile | output tok/s | TTFT p50 (s) | TTFT p90 (s) | later-turn TTFT p90 (s) | E2E p50 (s) | "
            f"failed | throughput vs {profiles[-1]} | p90 TTFT: {profiles[-1]} / this | later-turn p90: same |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, m in results.items():
        later, base_later = m["ttft_later_turns_ms"]["p90"], base["ttft_later_turns_ms"]["p90"]
        rows.append(
            f"| {name} | {m['output_throughput']:.1f} | {m['ttft_ms']['median'] / 1e3:.2f} | {m['ttft_ms']['p90'] / 1e3:.2f} | "
            f"{later / 1e3:.2f} | {m['e2e_ms']['median'] / 1e3:.2f} | {m['failed']} | "
            f"{m['output_throughput'] / base['output_throughput']:.2f}x | {base['ttft_ms']['p90'] / m['ttft_ms']['p90']:.2f}x | "
            f"{base_later / later:.2f}x |"
        )
    text = "\n".join(rows) + "\n"
    (out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
