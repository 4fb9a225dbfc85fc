"""Intent accuracy of the semantic router on a labeled set, with a confusion matrix, and classifier latency.

    python benchmarks/semantic_eval.py                       # shipped examples, shipped eval set
    python benchmarks/semantic_eval.py --config my.yaml --eval my.tsv --out result.json

The categories and their example utterances come from the config's
``semantic.signals.intents`` (default: examples/semantic-router.yaml); the eval set
(benchmarks/semantic/intent_eval.tsv, tab-separated ``category<TAB>prompt``) was
written for agora and shares no prompt with the examples. Latency is measured at
batch 1 on this machine: the full signal pass (intent, PII, jailbreak) per prompt.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agora.bench.report import cpu_description  # noqa: E402
from agora.router.config import load_config  # noqa: E402
from agora.router.semantic.router import SemanticRouter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples/semantic-router.yaml"))
    p.add_argument("--eval", default=str(ROOT / "benchmarks/semantic/intent_eval.tsv"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = load_config(args.config)
    assert config.semantic is not None, "the config has no semantic: section"
    router = SemanticRouter(config.semantic)
    assert router.intents is not None, "the config defines no intent categories"
    with open(args.eval, newline="") as f:
        rows = [(r["category"], r["prompt"]) for r in csv.DictReader(f, delimiter="\t")]
    examples = {e.lower() for c in config.semantic.signals.intents.categories for e in c.examples}
    overlap = [q for _, q in rows if q.lower() in examples]
    assert not overlap, f"eval prompts that are also examples: {overlap[:3]}"

    labels = [c.name for c in config.semantic.signals.intents.categories]
    names = [*labels, "none"]
    matrix = {t: dict.fromkeys(names, 0) for t in labels}
    latencies, wrong = [], []
    for _ in range(3):  # warm-up
        router.signals(rows[0][1], rows[0][1], [rows[0][1]])
    for truth, prompt in rows:
        t = time.perf_counter()
        sig, _ = router.signals(prompt, prompt, [prompt])
        latencies.append(time.perf_counter() - t)
        got = sig.intent.category or "none"
        matrix[truth][got] += 1
        if got != truth:
            wrong.append((truth, got, prompt))
    correct = sum(matrix[t][t] for t in labels)
    accuracy = correct / len(rows)
    width = max(len(n) for n in names) + 1
    print(f"intent accuracy: {accuracy:.1%} ({correct}/{len(rows)} prompts, {len(labels)} categories)\n")
    print("truth \\ predicted".ljust(width + 2) + "".join(n[:10].rjust(11) for n in names))
    for t in labels:
        print(t.ljust(width + 2) + "".join(str(matrix[t][n]).rjust(11) for n in names))
    print("\nmisclassified:")
    for truth, got, prompt in wrong:
        print(f"  {truth:>16} -> {got:<16} {prompt}")
    lat = sorted(latencies)
    p50, p90 = 1e3 * statistics.median(lat), 1e3 * lat[int(0.9 * len(lat))]
    print(f"\nsignal pass at batch 1 (intent + PII + jailbreak): p50 {p50:.1f} ms, p90 {p90:.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"host": f"{platform.node()}, {cpu_description()}",
                                              "accuracy": accuracy, "prompts": len(rows), "confusion": matrix,
                                              "latency_ms": {"p50": p50, "p90": p90},
                                              "misclassified": wrong}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
