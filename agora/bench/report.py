"""Terminal table, JSON result file and PNG plots for `agora bench serve`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def format_table(label: str, m: dict[str, Any]) -> str:
    lines = [f"============ {label} ============"]

    def row(name: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = fmt.format(value) if isinstance(value, float) else str(value)
        lines.append(f"{name:<38}{text:>14}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if m["failed"]:
        for kind, count in sorted(m["errors"].items()):
            row(f"  {kind}:", count)
        lines.append(f"  first error: {m['first_error']}")
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["input_tokens"])
    row("Total generated tokens:", m["output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    if "goodput" in m:
        row("Request goodput (req/s):", m["goodput"]["requests_per_s"])
    sections = [("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency"),
                ("ttft_later_turns_ms", "TTFT of later agent turns")]  # fmt: skip
    for key, title in sections:
        if key not in m:
            continue
        lines.append(f"{'-' * 14}{title}{'-' * 14}")
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize()} {short} (ms):", m[key][stat])
    lines.append("=" * 52)
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=float))


def write_plots(plot_dir: str | Path, runs: list[dict[str, Any]]) -> list[Path]:
    """Latency distributions per run, and throughput vs concurrency for a sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out_dir = Path(plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_s", "itl_s", "e2e_s"), ("TTFT", "ITL", "E2E latency"), strict=True):
        for run in runs:
            values = [v * 1000 for v in run["samples"][key]]
            if values:
                ax.hist(values, bins=40, alpha=0.5, label=run["label"])
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "latency_distributions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if len(runs) > 1:
        xs = [run["concurrency"] for run in runs]
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(xs, [run["metrics"]["output_throughput"] for run in runs], "o-", label="output tok/s")
        ax1.set_xlabel("concurrency")
        ax1.set_ylabel("output tokens/s")
        ax1.set_xscale("log", base=2)
        ax2 = ax1.twinx()
        ax2.plot(xs, [run["metrics"]["ttft_ms"]["p90"] for run in runs], "s--", color="tab:red", label="p90 TTFT")
        ax2.set_ylabel("p90 TTFT (ms)")
        fig.legend(loc="upper left")
        fig.tight_layout()
        path = out_dir / "throughput_vs_concurrency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
