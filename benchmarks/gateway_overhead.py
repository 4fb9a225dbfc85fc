"""Gateway overhead against an instant fake backend: added latency and requests/s.

Starts the fake OpenAI server (tests/router/fake_openai.py, answers at once) and
one `agora route` process in front of it, then, in one run, alternates
measurements direct to the backend and through the gateway:

* latency: one request at a time, chat completions (non-streaming and streaming);
  the added p50/p90 is the gateway's cost per request;
* throughput: N requests at fixed concurrency through the gateway, requests/s.

    python benchmarks/gateway_overhead.py --out benchmarks/results/gateway_overhead.json

The client runs on the same 2 cores as the gateway and the backend, so the
requests/s figure is a lower bound for the gateway alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from agora.router.replicas import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "system", "content": "You are a helpful coding agent. " * 40},
          {"role": "user", "content": "Fix the failing test in tests/test_api.py, please."}]  # fmt: skip


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    body = {"model": "m", "messages": PROMPT, "max_tokens": 8, "stream": stream}
    t = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - t


async def latencies(url: str, n: int, stream: bool) -> list[float]:
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            await one(s, url, stream)
        return [await one(s, url, stream) for _ in range(n)]


async def throughput(url: str, n: int, concurrency: int) -> tuple[float, int]:
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        queue = iter(range(n))

        async def worker() -> None:
            nonlocal errors
            for _ in queue:
                try:
                    await one(s, url, False)
                except (RuntimeError, aiohttp.ClientError):
                    errors += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t), errors


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(args: argparse.Namespace) -> dict:
    backend_port, gw_port = free_port(), free_port()
    env = {**os.environ, "AGORA_LOG_LEVEL": "WARNING"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests/router/fake_openai.py"),
                "--port",
                str(backend_port),
                "--model",
                "m",
                "--tokens",
                "4",
            ],
            env=env,
        ),  # fmt: skip
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agora.cli",
                "route",
                "--endpoint",
                f"http://127.0.0.1:{backend_port}",
                "--port",
                str(gw_port),
                "--profile",
                args.profile,
            ],
            env=env,
        ),  # fmt: skip
    ]
    try:
        backend, gateway = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{gw_port}"
        await wait_ready(backend + "/health")
        await wait_ready(gateway + "/health")
        result: dict = {"profile": args.profile, "rounds": args.rounds, "latency_requests": args.n}
        for stream in (False, True):
            direct, through = [], []
            for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits both alike
                direct += await latencies(backend, args.n, stream)
                through += await latencies(gateway, args.n, stream)
            key = "stream" if stream else "non_stream"
            result[key] = {
                "direct_p50_ms": 1e3 * statistics.median(direct),
                "gateway_p50_ms": 1e3 * statistics.median(through),
                "added_p50_ms": 1e3 * (statistics.median(through) - statistics.median(direct)),
                "added_p90_ms": 1e3 * (pct(through, 0.9) - pct(direct, 0.9)),
            }
        rps_direct, _ = await throughput(backend, args.throughput_requests, args.concurrency)
        rps, errors = await throughput(gateway, args.throughput_requests, args.concurrency)
        result["throughput"] = {"concurrency": args.concurrency, "requests": args.throughput_requests,
                                "gateway_rps": rps, "direct_rps": rps_direct, "errors": errors}  # fmt: skip
        return result
    finally:
        stop_all(procs)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Ask every process to stop, then wait for each (killing one that will not)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="sequential requests per latency round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--throughput-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--profile", default="prefix-aware")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = asyncio.run(run(args))
    for key in ("non_stream", "stream"):
        r = result[key]
        print(f"{key:>10}: direct p50 {r['direct_p50_ms']:.2f} ms, through gateway {r['gateway_p50_ms']:.2f} ms, "
              f"added p50 {r['added_p50_ms']:.2f} ms, p90 {r['added_p90_ms']:.2f} ms")  # fmt: skip
    t = result["throughput"]
    print(f"throughput at concurrency {t['concurrency']}: {t['gateway_rps']:.0f} req/s through the gateway "
          f"({t['direct_rps']:.0f} direct), {t['errors']} errors")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
