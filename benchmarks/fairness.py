"""Fairness under a flood: one tenant's interactive user while another tenant's agents run flat out.

    python benchmarks/fairness.py [--agents 32] [--seconds 60] [--out FILE]

Starts one `agora serve` engine (SmolLM2-135M, the default) and two gateways over it on the same
governance store: one with fair queueing on (``fairness.enabled``, a few slots per endpoint, one
of them kept for the interactive band), one with it off (every request forwarded at once, as
before). Tenant A's key is in the ``batch`` band and runs ``--agents`` concurrent agent loops
(chat requests of 64 tokens, back to back); tenant B's key is ``interactive`` and sends one short
streamed request at a time. B's time to first token is measured (p50, p90):

1. idle: B alone, no flood;
2. flood, fairness on;
3. flood, fairness off.

The issue's bar: B's TTFT p50 with fairness on within 2x of idle. Host recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import host_summary  # noqa: E402

from agora.router.replicas import free_port  # noqa: E402

A_PROMPT = "You are a coding agent. Summarize the following file in detail. " + "def f(x): return x + 1\n" * 40
B_PROMPT = "What is the capital of France? Answer in one word."


def _wait(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not come up")


def _key(db: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "agora.cli", "keys", "create", "--db", db, "--json", *args],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)["key"]


async def _ttft(client: httpx.AsyncClient, url: str, key: str) -> float:
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": B_PROMPT}]}  # fmt: skip
    t = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as r:  # fmt: skip
        r.raise_for_status()
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line.replace(" ", "") and \
                    '"content":""' not in line.replace(" ", ""):  # fmt: skip
                first = time.perf_counter() - t
        return first if first is not None else time.perf_counter() - t


async def _agent(client: httpx.AsyncClient, url: str, key: str, stop: asyncio.Event, done: list[int]) -> None:
    body = {"model": "smollm2-135m-instruct", "max_tokens": 64, "temperature": 0.7,
            "messages": [{"role": "user", "content": A_PROMPT}]}  # fmt: skip
    while not stop.is_set():
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        done.append(r.status_code)
        if r.status_code != 200:
            await asyncio.sleep(0.2)


async def _phase(url: str, a_key: str, b_key: str, agents: int, seconds: float) -> dict:
    stop, done = asyncio.Event(), []
    limits = httpx.Limits(max_connections=agents + 8, max_keepalive_connections=agents + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        flood = [asyncio.create_task(_agent(client, url, a_key, stop, done)) for _ in range(agents)]
        if agents:
            await asyncio.sleep(min(10.0, seconds / 4))  # let the flood fill the engine
        ttfts = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ttfts.append(await _ttft(client, url, b_key))
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*flood)
    ttfts.sort()
    return {"b_requests": len(ttfts), "b_ttft_p50_s": round(statistics.median(ttfts), 4),
            "b_ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4), "a_requests": len(done),
            "a_ok": done.count(200)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--slots", type=int, default=4, help="fairness.slots_per_endpoint")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agora-fairness-"))
    db = f"sqlite:///{tmp / 'gov.db'}"
    procs: list[subprocess.Popen] = []
    try:
        eport = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "agora.cli", "serve", "--port", str(eport)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        _wait(f"http://127.0.0.1:{eport}/health")
        a_key = _key(db, "--tenant", "tenant-a", "--priority", "batch")
        b_key = _key(db, "--tenant", "tenant-b")
        urls = {}
        for name, fairness in (("on", {"enabled": True, "slots_per_endpoint": args.slots,
                                       "interactive_reserve": 1}), ("off", {"enabled": False})):  # fmt: skip
            port = free_port()
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({"endpoints": [{"url": f"http://127.0.0.1:{eport}"}], "db": db,
                                           "gateway": {"port": port}, "fairness": fairness}))  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-m", "agora.cli", "route", "--config", str(cfg)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            urls[name] = f"http://127.0.0.1:{port}"
            _wait(f"{urls[name]}/health")
        time.sleep(1.5)  # the gateways load the keys
        results = {"idle": asyncio.run(_phase(urls["on"], a_key, b_key, 0, min(20.0, args.seconds)))}
        print("idle", results["idle"], file=sys.stderr, flush=True)
        for name in ("on", "off"):
            results[f"fairness_{name}"] = asyncio.run(_phase(urls[name], a_key, b_key, args.agents, args.seconds))
            print(name, results[f"fairness_{name}"], file=sys.stderr, flush=True)
        idle = results["idle"]["b_ttft_p50_s"]
        out = {
            "benchmark": "fairness", "host": host_summary(), "model": "smollm2-135m-instruct",
            "agents_tenant_a": args.agents, "seconds": args.seconds, "slots_per_endpoint": args.slots,
            "interactive_reserve": 1, "results": results,
            "ratio_on_vs_idle": round(results["fairness_on"]["b_ttft_p50_s"] / idle, 2),
            "ratio_off_vs_idle": round(results["fairness_off"]["b_ttft_p50_s"] / idle, 2),
            "command": "python benchmarks/fairness.py " + " ".join(sys.argv[1:]),
        }  # fmt: skip
        print(json.dumps(out, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
