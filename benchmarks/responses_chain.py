"""What the prefix cache does for a Responses chain: time to first token of each turn of a
``previous_response_id`` chain, against the same chain on a server with prefix caching off.

    python benchmarks/responses_chain.py [--turns 6] [--out FILE]

Each run starts `agora serve` (SmolLM2-135M, the default) on a free port, then one agent: long
instructions (a coding agent's system prompt is thousands of tokens), a user request, and every
turn after it sends only a function call's output plus ``previous_response_id``: the server
rebuilds the whole conversation from its store. Streamed; TTFT is the first output_text delta.
Runs alternate (cache on, cache off, ...) ``--repeats`` times; medians per turn, and the host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import host_summary  # noqa: E402

from agora.router.replicas import free_port  # noqa: E402

INSTRUCTIONS = ("You are a careful coding agent working in a large repository. Follow the rules. " * 60).strip()
TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file of the repository",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]  # fmt: skip


def serve(extra: list[str], store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "agora.cli", "serve", "--port", str(port), "--responses-store", str(store), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def turn(client: httpx.Client, body: dict) -> tuple[float, str, int]:
    """(TTFT seconds, response id, input tokens) of one streamed turn."""
    t0 = time.perf_counter()
    ttft, rid, tokens = None, "", 0
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if ttft is None and event["type"] in (
                "response.output_text.delta",
                "response.function_call_arguments.delta",
            ):
                ttft = time.perf_counter() - t0
            if event["type"] in ("response.completed", "response.incomplete"):
                rid, tokens = event["response"]["id"], event["response"]["usage"]["input_tokens"]
    return ttft or float("nan"), rid, tokens


def chain(url: str, turns: int) -> list[tuple[float, int]]:
    with httpx.Client(base_url=url) as client:
        common = {"model": "SmolLM2-135M-Instruct", "tools": TOOLS, "max_output_tokens": 16, "temperature": 0}
        ttft, rid, tokens = turn(client, {**common, "instructions": INSTRUCTIONS,
                                          "input": "Find where the parser is defined."})  # fmt: skip
        out = [(ttft, tokens)]
        for i in range(1, turns):
            output = f"file {i}: " + "def parse(text):\n    return tokens\n" * 20
            ttft, rid, tokens = turn(client, {**common, "instructions": INSTRUCTIONS, "previous_response_id": rid,
                                              "input": [{"role": "user", "content": output}]})  # fmt: skip
            out.append((ttft, tokens))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, list[list[tuple[float, int]]]] = {"prefix-cache": [], "no-prefix-cache": []}
    flags = {"prefix-cache": [], "no-prefix-cache": ["--no-enable-prefix-caching"]}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, extra in flags.items():
                proc, url = serve(extra, Path(tmp) / f"{name}-{rep}.db")
                try:
                    chain(url, 2)  # warm-up: kernels, first compile of anything
                    results[name].append(chain(url, args.turns))
                finally:
                    proc.terminate()
                    proc.wait(30)
                print(f"repeat {rep + 1} {name}: " + ", ".join(f"{t * 1000:.0f} ms ({n} tok)"
                                                               for t, n in results[name][-1]), flush=True)  # fmt: skip
    host = host_summary()
    summary = {name: [statistics.median(run[i][0] for run in runs) for i in range(args.turns)]
               for name, runs in results.items()}  # fmt: skip
    tokens = [results["prefix-cache"][0][i][1] for i in range(args.turns)]
    print(f"\nhost: {host}")
    print("turn  input tokens  TTFT prefix cache  TTFT no prefix cache")
    for i in range(args.turns):
        print(f"{i + 1:>4}  {tokens[i]:>12}  {summary['prefix-cache'][i] * 1000:>14.0f} ms  "
              f"{summary['no-prefix-cache'][i] * 1000:>17.0f} ms")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "host": host, "input_tokens": tokens,
                                              "ttft_s_median": summary, "runs": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
