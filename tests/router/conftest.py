"""Real processes for the gateway's integration tests: fake OpenAI servers and `agora route`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from agora.router.replicas import free_port

FAKE = Path(__file__).with_name("fake_openai.py")


@dataclass
class Proc:
    url: str
    proc: subprocess.Popen

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats").json()

    def mode(self, mode: str, **extra: int) -> None:
        httpx.post(f"{self.url}/admin/mode", json={"mode": mode, **extra}).raise_for_status()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def wait_http(url: str, timeout: float = 30.0, ok=(200,)) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code in ok:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def requests_in_flight(url: str, bodies: list[tuple[str, dict]]) -> tuple[list, threading.Event]:
    """The requests sent at once; returns when each stream has sent its first event (a whole answer: when it is
    sent). Each result: a stream's SSE data lines, a whole answer's response, or the exception that ended it;
    the event is set when all are over."""
    results: list = [None] * len(bodies)
    under_way = [threading.Event() for _ in bodies]

    def one(i: int, path: str, body: dict) -> None:
        try:
            if not body.get("stream"):
                under_way[i].set()
                results[i] = httpx.post(url + path, json=body, timeout=120)
                return
            lines: list[str] = []
            with httpx.stream("POST", url + path, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        under_way[i].set()
            results[i] = lines
        except Exception as exc:  # noqa: BLE001 - what the client saw
            results[i] = exc
        finally:
            under_way[i].set()

    threads = [threading.Thread(target=one, args=(i, *b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for e in under_way:
        e.wait(60)
    done = threading.Event()
    threading.Thread(target=lambda: ([t.join() for t in threads], done.set())).start()
    return results, done


class Procs:
    """Starts processes and stops every one of them at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def fake(self, name: str, models: tuple[str, ...] = ("m",), tokens: int = 4, delay_ms: float = 0,
             flags: tuple[str, ...] = ()) -> Proc:  # fmt: skip
        port = free_port()
        cmd = [sys.executable, str(FAKE), "--port", str(port), "--name", name, "--tokens", str(tokens),
               "--delay-ms", str(delay_ms), *flags]  # fmt: skip
        for m in models:
            cmd += ["--model", m]
        p = subprocess.Popen(cmd)
        self.procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/v1/models")
        return Proc(url, p)

    def gateway(self, config: dict, wait: bool = True, timeout: float = 30.0) -> Proc:
        port = free_port()
        config = {"db": f"sqlite:///{self.tmp_path / f'governance-{port}.db'}", **config,
                  "gateway": {"port": port, "scrape_interval_s": 0.1, "seed": 0, **config.get("gateway", {})}}  # fmt: skip
        path = self.tmp_path / f"router-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "AGORA_LOG_LEVEL": "DEBUG"}
        p = subprocess.Popen([sys.executable, "-m", "agora.cli", "route", "--config", str(path)], env=env)
        self.procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout, ok=(200,) if wait else (200, 503))
        return Proc(url, p)

    def gateway_from_file(self, path: Path) -> Proc:
        """`agora route --config path` as written (the caller sets the port or leaves 8080 free)."""
        config = yaml.safe_load(path.read_text())
        port = free_port()
        config.setdefault("gateway", {}).update({"port": port, "scrape_interval_s": 0.1, "seed": 0})
        config.setdefault("db", f"sqlite:///{self.tmp_path / f'governance-{port}.db'}")
        path.write_text(yaml.safe_dump(config))
        p = subprocess.Popen([sys.executable, "-m", "agora.cli", "route", "--config", str(path)])
        self.procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=120)
        return Proc(url, p)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()


def metric(url: str, name: str, labels: str = "") -> float:
    total, found = 0.0, False
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not exported"
    return total


def until(check, timeout: float = 10.0):  # noqa: ANN001, ANN201
    """``check()``'s first truthy value, polling; its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def metric_when(url: str, name: str, labels: str = "", want: float = 0.0, timeout: float = 10.0) -> float:
    """The metric once it equals `want`, or its last value after `timeout`: the gateway records a
    request when its relay ends, which may be a moment after the client has its last byte."""
    deadline = time.monotonic() + timeout
    while (value := metric(url, name, labels)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
