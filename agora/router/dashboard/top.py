"""``agora top``: the dashboard's feed in a terminal, for people on a server over SSH.

It reads ``/dashboard/events`` (the same snapshots the page draws) and redraws a rich
view on each one: endpoints, rates, latency percentiles, tenants, the latest routing
decisions. ``q`` (or Ctrl-C) quits. The key comes from ``--api-key`` or ``AGORA_API_KEY``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from agora import envs

_DEFAULT_URL = "http://127.0.0.1:8000"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="a live terminal view of a gateway (its /dashboard feed)",
                       description="Endpoints, request rates, latency percentiles and tenants of a running "
                                   "gateway (`agora route`, `agora serve --replicas N`, `--db`, `--ray`), "
                                   "redrawn live. q quits.")  # fmt: skip
    p.add_argument("url", nargs="?", default=_DEFAULT_URL, help=f"the gateway (default {_DEFAULT_URL})")
    p.add_argument("--api-key", default=envs.api_key(),
                   help="an admin key, when the gateway has keys (default: $AGORA_API_KEY)")  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, help="seconds between updates (0.25 to 60; default 1)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (no live view)")


class _Feed(threading.Thread):
    """Reads the event stream in the background; the latest snapshot (or the last error) for the view."""

    def __init__(self, url: str, key: str | None, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url.rstrip("/"), interval
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.latest: dict[str, Any] | None = None
        self.error: str | None = None
        self.fatal = False  # refused (401/403/404): no point retrying
        self.version = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for snapshot in self._events():
                    self.latest, self.error = snapshot, None
                    self.version += 1
                    if self.stopped.is_set():
                        return
                self.error = "the gateway closed the feed"
            except _Refused as exc:
                self.error, self.fatal = str(exc), True
                self.version += 1
                return
            except (httpx.HTTPError, OSError, ValueError) as exc:
                self.error = f"cannot read {self.url}: {type(exc).__name__}: {exc}"
            self.version += 1
            self.stopped.wait(2.0)

    def _events(self) -> Iterator[dict[str, Any]]:
        with httpx.stream("GET", f"{self.url}/dashboard/events", params={"interval": self.interval},
                          headers=self.headers, timeout=httpx.Timeout(10.0, read=self.interval + 30)) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.read()
                raise _Refused(refusal(self.url, resp.status_code, resp.text))
            event, data = "message", []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    text, data = "\n".join(data), []
                    if event == "snapshot":
                        yield json.loads(text)
                    elif event == "ended":
                        why = json.loads(text)
                        if why.get("relogin"):
                            raise _Refused(f"the gateway ended the feed: {why.get('reason')}")
                        raise ValueError(why.get("reason", "the gateway ended the feed"))  # retried
                    event = "message"


class _Refused(Exception):
    pass


def refusal(url: str, status: int, body: str) -> str:
    """What to tell the user when the gateway says no."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200]
    if status == 404:
        return (
            f"{url} has no dashboard ({message}): is it an agora gateway (`agora route`, `agora serve --replicas N`)?"
        )
    if status in (401, 403):
        return f"{url} refused the feed ({status}): {message}. Pass an admin key with --api-key or AGORA_API_KEY."
    return f"{url} answered {status}: {message}"


# -- the view ------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.0f}")


def _rate(values: list[int], seconds: int) -> float:
    window = values[-seconds - 1 : -1]  # the current second is still filling
    return sum(window) / max(1, len(window))


def render(s: dict[str, Any], url: str, error: str | None = None) -> Any:
    """One snapshot as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    gw, t, sr, lm = s["gateway"], s["totals"], s["series"], s["latency"]["last_minute"]
    head = Text()
    head.append("agora top ", style="bold")
    head.append(f"{url}  v{gw['version']}  profile {gw['profile']}  up {int(gw['uptime_s'])}s  ")
    head.append(f"{'keys' if gw['keys'] else 'no keys'}", style="dim")
    head.append("   q quits", style="dim")
    if error:
        head.append(f"\n{error}", style="bold red")
    rates = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
    for col in ("answered", "req/s 10s", "req/s 60s", "rejected", "errors", "retries", "prefix hits",
                "TTFT p50", "TTFT p95", "TTFT p99", "ITL p50", "ITL p95", "ITL p99"):  # fmt: skip
        rates.add_column(col, justify="right")
    rates.add_row(str(t["requests"]), f"{_rate(sr['requests'], 10):.1f}", f"{_rate(sr['requests'], 60):.1f}",
                  str(t["rejected"]), str(t["errors"]), str(t["retries"]), _pct(t["prefix_hit_ratio"]),
                  *(_ms(lm[k][f"p{q}"]) for k in ("ttft", "itl") for q in (50, 95, 99)))  # fmt: skip
    eps = Table(title="endpoints", title_justify="left", expand=True)
    for col in ("endpoint", "models", "state", "in flight", "running", "waiting", "KV", "prefix hits", "requests",
                "errors"):  # fmt: skip
        eps.add_column(col, justify="left" if col in ("endpoint", "models", "state") else "right")
    for ep in s["endpoints"]:
        state = Text("ejected", style="red") if ep["ejected"] else (
            Text("healthy", style="green") if ep["healthy"] else Text("unhealthy", style="red"))  # fmt: skip
        eps.add_row(ep["name"], ", ".join(ep["models"]), state, str(ep["in_flight"]), str(ep["running"]),
                    str(ep["waiting"]), _pct(ep["kv_usage"]), _pct(ep["prefix_hit_ratio"]), str(ep["requests"]),
                    str(ep["errors"]))  # fmt: skip
    tenants = Table(title="tenants", title_justify="left", expand=True)
    for col in ("tenant", "requests", "tokens in", "tokens out", "budget left", "throttled", "blocked"):
        tenants.add_column(col, justify="left" if col == "tenant" else "right")
    for r in s["tenants"][:10]:
        budget = "-" if r["budget_tokens"] is None else f"{r['budget_left']} of {r['budget_tokens']}"
        tenants.add_row(r["tenant"], str(r["requests"]), str(r["tokens_in"]), str(r["tokens_out"]), budget,
                        str(r["throttled"]), str(r["blocked"]))  # fmt: skip
    routing = Table(title="latest routing decisions", title_justify="left", expand=True)
    for col in ("time", "model", "picked", "candidates (total score)"):
        routing.add_column(col)
    for r in s["routing"][:5]:
        cands = "  ".join(f"{c['endpoint']} {c['total']:.2f}" for c in r["candidates"])
        routing.add_row(time.strftime("%H:%M:%S", time.localtime(r["time"])), r["model"] or "-", r["endpoint"], cands)
    return Group(head, rates, eps, tenants, routing)


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """stdin in cbreak mode (keys arrive one at a time, unechoed), restored on the way out."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    if fd is None:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 32).lower().startswith(b"q")


def main(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would scribble on the view
    if not 0.25 <= args.interval <= 60:
        print("agora top: error: --interval must be between 0.25 and 60 seconds", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    if args.once:
        try:
            resp = httpx.get(f"{url}/dashboard/snapshot", timeout=10,
                             headers={"authorization": f"Bearer {args.api_key}"} if args.api_key else {})  # fmt: skip
        except httpx.HTTPError as exc:
            print(f"agora top: error: cannot reach {url}: {exc}", file=sys.stderr)
            return 1
        if resp.status_code != 200:
            print(f"agora top: error: {refusal(url, resp.status_code, resp.text)}", file=sys.stderr)
            return 1
        from rich.console import Console

        Console().print(render(resp.json(), url))
        return 0
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    feed = _Feed(url, args.api_key, args.interval)
    feed.start()
    seen = -1
    console = Console()
    try:
        with _keys() as fd, Live(Text(f"connecting to {url} ..."), console=console, screen=True,
                                 auto_refresh=False) as live:  # fmt: skip
            while True:
                if _quit_pressed(fd, 0.1):
                    break
                if feed.fatal:
                    break
                if feed.version != seen:
                    seen = feed.version
                    if feed.latest is not None:
                        live.update(render(feed.latest, url, feed.error), refresh=True)
                    elif feed.error:
                        live.update(Text(f"{feed.error}\nretrying ... (q quits)", style="red"), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        feed.stopped.set()
    if feed.fatal:
        print(f"agora top: error: {feed.error}", file=sys.stderr)
        return 1
    return 0
