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


_HTML_ROWS = (
    ("Successful requests", "completed", "{:d}"),
    ("Failed requests", "failed", "{:d}"),
    ("Duration (s)", "duration_s", "{:.2f}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", "{:.2f}"),
)
_HTML_LATENCY = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"),
                 ("ttft_later_turns_ms", "TTFT of later agent turns"))  # fmt: skip


def write_html(path: str | Path, runs: list[dict[str, Any]], settings: dict[str, Any], date: str,
               plot_dir: str | Path | None = None) -> Path:  # fmt: skip
    """One self-contained page (no script, no network): the settings, a table with a column per run and
    the plots embedded, so a comparison can be shared as one file."""
    import base64
    import html
    import platform
    import tempfile

    esc = html.escape
    with tempfile.TemporaryDirectory() as tmp:
        plots = write_plots(plot_dir or tmp, runs)
        images = [(p.stem.replace("_", " "), base64.b64encode(p.read_bytes()).decode()) for p in plots]
    head = "".join(f"<th>{esc(r['label'])}</th>" for r in runs)
    rows = []
    for title, key, fmt in _HTML_ROWS:
        cells = "".join(f"<td>{fmt.format(r['metrics'][key])}</td>" for r in runs)
        rows.append(f"<tr><th>{esc(title)}</th>{cells}</tr>")
    if any("goodput" in r["metrics"] for r in runs):
        cells = "".join(f"<td>{r['metrics']['goodput']['requests_per_s']:.2f}</td>" if "goodput" in r["metrics"]
                        else "<td>-</td>" for r in runs)  # fmt: skip
        rows.append(f"<tr><th>Request goodput (req/s)</th>{cells}</tr>")
    for key, title in _HTML_LATENCY:
        if not any(key in r["metrics"] for r in runs):
            continue
        for stat in ("mean", "median", "p90", "p99"):
            cells = "".join(f"<td>{r['metrics'][key][stat]:.2f}</td>" if key in r["metrics"] else "<td>-</td>"
                            for r in runs)  # fmt: skip
            rows.append(f"<tr><th>{esc(title)} {stat} (ms)</th>{cells}</tr>")
    shown = {k: v for k, v in settings.items() if k not in ("api_key", "func") and v is not None}
    setting_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in sorted(shown.items()))
    figures = "".join(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{esc(name)}</figcaption></figure>" for name, data in images)  # fmt: skip
    if not images:
        figures = "<p>No plots: matplotlib is not installed (pip install matplotlib).</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agora bench serve: {esc(date)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }}
table {{ border-collapse: collapse; margin: 12px 0 24px; }}
th, td {{ border: 1px solid #e2e5ea; padding: 4px 10px; text-align: right; font-variant-numeric: tabular-nums; }}
tr th:first-child {{ text-align: left; font-weight: 500; }}
thead th {{ background: #f6f7f9; }}
img {{ max-width: 100%; border: 1px solid #e2e5ea; }}
figure {{ margin: 0 0 18px; }}
</style></head><body>
<h1>agora bench serve</h1>
<p>{esc(date)} · client host {esc(platform.node())} ({esc(cpu_description())}) · {len(runs)} run(s)</p>
<h2>Results</h2>
<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Plots</h2>
{figures}
<h2>Settings</h2>
<table><tbody>{setting_rows}</tbody></table>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def cpu_description() -> str:
    """This machine's CPU for benchmark records: model, cores, and whether it has AVX-512."""
    import os
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags else 'AVX2, no AVX-512'}"
