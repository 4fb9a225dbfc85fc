"""What telling a reasoning model's thinking from its answer costs the chat path, per output token:
ChatStream.feed over one choice's outputs (a token each), for a model that does not reason, a reasoning
model (thinking, then the answer), and the same with the hermes tool parser reading the answer. Rounds
alternate between the three so drift hits them alike; the median of the rounds is reported.

    python benchmarks/reasoning_split.py --out benchmarks/results/reasoning_split.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from types import SimpleNamespace

from agora.bench.report import cpu_description
from agora.openai.accumulate import ChatStream
from agora.openai.reasoning import MAY_OPEN
from agora.openai.tool_parsers import PARSERS


def outputs(tokens: int) -> list[SimpleNamespace]:
    """``tokens`` outputs of one token each: <think>, thinking words, </think>, answer words."""
    half = tokens // 2
    texts = ["<think>", *[" word"] * (half - 2), "</think>", *[" answer"] * (tokens - half)]
    return [SimpleNamespace(index=0, text=t, token_ids=[1], logprobs=[], finished=i == len(texts) - 1,
                            finish_reason="stop" if i == len(texts) - 1 else None, stop_reason=None,
                            num_cached_tokens=0, text_offsets=[0], prompt_logprobs=None)
            for i, t in enumerate(texts)]  # fmt: skip


def per_token_us(outs: list[SimpleNamespace], think: str | None, tools: bool) -> float:
    acc = ChatStream("chatcmpl-1", "m", 1, 10, logprobs=False, token_text=str, think=think,
                     tool_parser=PARSERS["hermes"] if tools else None)  # fmt: skip
    start = time.perf_counter()
    for out in outs:
        acc.feed(0, out)
    return (time.perf_counter() - start) / len(outs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    outs = outputs(args.tokens)
    cases = {"no reasoning": (None, False), "reasoning": (MAY_OPEN, False), "reasoning + tools": (MAY_OPEN, True)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (think, tools) in cases.items():
            times[name].append(per_token_us(outs, think, tools))
    result = {
        "host": {"cpu": cpu_description(), "python": platform.python_version()},
        "tokens": args.tokens,
        "rounds": args.rounds,
        "us_per_token_median": {name: round(statistics.median(t), 2) for name, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
