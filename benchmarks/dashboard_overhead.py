"""What the dashboard costs the gateway: request latency with it off, on with nobody watching, and on
with a feed open (four updates a second), side by side; and how long one snapshot takes to build.

One instant fake backend (tests/router/fake_openai.py) and three `agora route` processes in front of
it (dashboard off / on / on and watched), measured in alternating rounds so that drift on a noisy
machine hits all three alike.

    python benchmarks/dashboard_overhead.py --out benchmarks/results/dashboard_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from agora.bench.report import cpu_description
from agora.router.replicas import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gateway_overhead import latencies, stop_all, wait_ready  # noqa: E402


async def watch(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """An open feed, read to the end of each event, as a browser would."""
    async with aiohttp.ClientSession() as s, s.get(url + "/dashboard/events?interval=0.25") as r:
        assert r.status == 200, r.status
        while not stop.is_set():
            line = await r.content.readline()
            if line.startswith(b"event: snapshot"):
                counts["events"] += 1


async def snapshot_ms(url: str, n: int) -> float:
    async with aiohttp.ClientSession() as s:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            async with s.get(url + "/dashboard/snapshot") as r:
                await r.read()
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.25)  # past the 0.2 s the gateway shares one snapshot for
        return 1e3 * statistics.median(times)


async def run(args: argparse.Namespace) -> dict:
    env = {**os.environ, "AGORA_LOG_LEVEL": "WARNING"}
    backend_port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/router/fake_openai.py"), "--port",
                               str(backend_port), "--model", "m", "--tokens", "4"], env=env)]  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    urls = {}
    for name, enabled in (("off", False), ("on", True), ("watched", True)):
        port = free_port()
        config = {"endpoints": [{"url": f"http://127.0.0.1:{backend_port}"}], "db": f"sqlite:///{tmp / name}.db",
                  "gateway": {"port": port}, "dashboard": {"enabled": enabled}}  # fmt: skip
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "agora.cli", "route", "--config",
                                       str(tmp / f"{name}.yaml")], env=env))  # fmt: skip
        urls[name] = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    try:
        await wait_ready(f"http://127.0.0.1:{backend_port}/health")
        for url in urls.values():
            await wait_ready(url + "/health")
        counts = {"events": 0}
        watcher = asyncio.create_task(watch(urls["watched"], stop, counts))
        samples: dict[str, dict[str, list[float]]] = {n: {"non_stream": [], "stream": []} for n in urls}
        for _ in range(args.rounds):
            for stream in (False, True):
                for name, url in urls.items():
                    samples[name]["stream" if stream else "non_stream"] += await latencies(url, args.n, stream)
        build = await snapshot_ms(urls["on"], 40)  # 50 routing decisions and audit records in its rings by now
        stop.set()
        watcher.cancel()
        result: dict = {"host": f"{platform.node()} {platform.machine()}", "cpu": cpu_description(), "rounds": args.rounds,
                        "requests_per_round": args.n, "feed_events_read": counts["events"],
                        "snapshot_request_p50_ms": round(build, 3)}  # fmt: skip
        for kind in ("non_stream", "stream"):
            result[kind] = {name: {"p50_ms": round(1e3 * statistics.median(samples[name][kind]), 3),
                                   "p90_ms": round(1e3 * sorted(samples[name][kind])[int(0.9 * len(samples[name][kind]))],
                                                   3)} for name in urls}  # fmt: skip
        return result
    finally:
        stop.set()
        stop_all(procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="sequential requests per latency round and gateway")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(f"host: {result['host']}, {result['cpu']}")
    for kind in ("non_stream", "stream"):
        row = ", ".join(f"{name} p50 {v['p50_ms']:.2f} ms (p90 {v['p90_ms']:.2f})" for name, v in result[kind].items())
        print(f"{kind:>10}: {row}")
    print(f"one snapshot over HTTP: p50 {result['snapshot_request_p50_ms']:.2f} ms; "
          f"feed events read while measuring: {result['feed_events_read']}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
