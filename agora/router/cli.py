"""`agora route`: run the gateway over endpoints from a YAML config and/or the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agora import envs
from agora.config import parse_aliases, parse_origins
from agora.router.config import SHIPPED_PROFILES, ConfigError, EndpointSpec, RouterConfig, load_config, parse_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="run the gateway over OpenAI-compatible endpoints",
                       description="One OpenAI endpoint in front of many: agora, vLLM or llama.cpp servers, "
                                   "routed by prefix cache and load.")  # fmt: skip
    p.add_argument("--config", default=None, help="router YAML (endpoints, gateway, plugins, schedulingProfiles)")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="a backend, e.g. http://127.0.0.1:8001/v1 (repeat for more)")  # fmt: skip
    p.add_argument("--profile", default=None,
                   help=f"scheduling profile (shipped: {', '.join(SHIPPED_PROFILES)}; default prefix-aware)")  # fmt: skip
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help="require this bearer token from clients (default: the config's, else $AGORA_API_KEY)")  # fmt: skip
    p.add_argument("--model-alias", action="append", default=[], metavar="PATTERN=NAME",
                   help="route requests for model names matching PATTERN (a name or a glob such as 'claude-*') "
                        "to the model NAME; repeatable")  # fmt: skip
    p.add_argument("--db", default=None, help="governance store (keys, budgets, audit): sqlite:///path or "
                   "postgresql://...; default: governance.db in the agora cache folder")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may run before they end with an error in their "
                        "API's shape (default 30)")  # fmt: skip
    p.add_argument("--client-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a client may take to send a request's headers, and the longest pause in its "
                        "body (default 60)")  # fmt: skip
    p.add_argument("--allowed-origins", type=_origins, default=None, metavar="JSON",
                   help='browser pages from these origins may call the gateway (CORS), e.g. \'["https://app.example.com"]\' '
                        "or '[\"*\"]'; default none")  # fmt: skip
    p.add_argument("--uvicorn-log-level", default="warning")


def _origins(text: str) -> list[str]:
    try:
        return list(parse_origins(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_config(args: argparse.Namespace) -> RouterConfig:
    """The config file (if any) with the command line's endpoints and overrides applied."""
    config = load_config(args.config) if args.config else RouterConfig()
    data = config.model_dump(by_alias=True, exclude_unset=True)
    data["endpoints"] = [*data.get("endpoints", []), *(EndpointSpec(url=u).model_dump(exclude_unset=True)
                                                      for u in args.endpoint)]  # fmt: skip
    gateway = data.setdefault("gateway", {})
    for key, flag in (("host", "host"), ("port", "port"), ("api_key", "api_key"), ("allowed_origins", "allowed_origins"),
                      ("shutdown_timeout_s", "shutdown_timeout"), ("client_timeout_s", "client_timeout")):  # fmt: skip
        if getattr(args, flag, None) is not None:
            gateway[key] = getattr(args, flag)
    if gateway.get("api_key") is None:
        gateway["api_key"] = envs.api_key()
    if args.profile is not None:
        data["profile"] = args.profile
    if getattr(args, "db", None) is not None:
        data["db"] = args.db
    if args.model_alias:
        data["model_aliases"] = {**data.get("model_aliases", {}), **dict(parse_aliases(args.model_alias))}
    config = parse_config(data, args.config or "command line")
    if not config.endpoints:
        raise ConfigError("no endpoints: give --endpoint URL (repeatable) or endpoints: in --config")
    return config


def run_gateway(config: RouterConfig, endpoints=None, log_level: str = "warning",  # noqa: ANN001
                config_path: str | None = None, discover=None, sock=None) -> None:  # noqa: ANN001  # fmt: skip
    """Serve the gateway until Ctrl-C or SIGTERM (then it drains: agora.http_server); ``discover`` (agora.cluster)
    keeps its endpoint set current. ``sock``: a socket already bound to the gateway's address (held while
    replicas start, so nothing takes the port)."""
    from agora.http_server import HEAD_SLACK, CrossOrigin, draining_server, loopback_name
    from agora.router.gateway import Gateway

    app = Gateway(config, endpoints, config_path, discover)
    s = config.gateway
    print(f"agora gateway on http://{s.host}:{s.port}/v1 (profile {config.profile})", file=sys.stderr, flush=True)
    # Open dashboard feeds never end by themselves: they end at the signal, or shutting down waits for them.
    options: dict[str, Any] = {"log_level": log_level, "lifespan": "on", "client_timeout_s": s.client_timeout_s,
                               "max_head_bytes": s.max_header_bytes + HEAD_SLACK,  # the 431 is the gateway's
                               "refused": app.metrics.refused}  # fmt: skip
    # other sites' pages: refused
    served = CrossOrigin(app, s.allowed_origins, local=loopback_name(s.host), refused=app.metrics.refused)
    if sock is None:
        draining_server(served, s.shutdown_timeout_s, app.end_requests, app.closing, host=s.host, port=s.port,
                        **options).run()  # fmt: skip
        return
    # The socket itself, not its fd: uvicorn takes an fd for a Unix socket, and asyncio then leaves Nagle's
    # algorithm on for the accepted TCP connections (40 ms stalls per request).
    server = draining_server(served, s.shutdown_timeout_s, app.end_requests, app.closing, **options)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run swallows it too)
        pass


def bind_gateway(config: RouterConfig):  # noqa: ANN201
    """The gateway's listening socket, bound now: OSError at once if the address is taken."""
    import socket

    s = config.gateway
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.host, s.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {s.host}:{s.port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def main(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"agora route: error: {exc}", file=sys.stderr)
        return 2
    run_gateway(config, log_level=args.uvicorn_log_level, config_path=args.config)
    return 0
