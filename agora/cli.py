"""The `agora` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from agora import __version__, envs
from agora.config import (
    DEFAULT_MODEL,
    REASONING_PARSERS,
    CacheConfig,
    ClusterConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServeConfig,
    ServerConfig,
    add_arguments,
    from_arguments,
    parse_aliases,
)
from agora.models.catalog import CATALOG


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API",
                       description="Serve a model over an OpenAI-compatible HTTP API.")  # fmt: skip
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF model folder, .gguf file, or packaged model ({', '.join(CATALOG)}); "
                        f"default: {DEFAULT_MODEL}")  # fmt: skip
    from agora.openai.tool_parsers import PARSERS

    # Every engine and server flag comes from its config field (agora.config): one default, one check.
    add_arguments(p, ServerConfig, {"tool_call_parser": {"choices": sorted(PARSERS)},
                                    "reasoning_parser": {"choices": REASONING_PARSERS}})  # fmt: skip
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model id(s) the API answers to; the first is the one it reports")  # fmt: skip
    p.add_argument("--model-alias", action="append", default=[], metavar="PATTERN=NAME",
                   help="also answer to model names matching PATTERN (a name or a glob such as 'claude-*'); "
                        "repeatable")  # fmt: skip
    p.add_argument("--api-key", default=envs.api_key(),
                   help="require this bearer token on /v1 endpoints (default: $AGORA_API_KEY)")  # fmt: skip
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, EngineConfig):
        add_arguments(p, cls)
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool_choice auto is always available")  # fmt: skip
    p.add_argument("--uvicorn-log-level", default="warning")
    p.add_argument("--serve-config", default=None, help=argparse.SUPPRESS)  # JSON ServeConfig: how replicas start
    g = p.add_argument_group("replicas and the gateway")
    g.add_argument("--replicas", type=int, default=1,
                   help="engine replicas behind one gateway on --host:--port (default 1: no gateway); with "
                        "--ray, Ray Serve replicas anywhere in the cluster")  # fmt: skip
    g.add_argument("--router-profile", default=None, help="gateway profile with --replicas (default prefix-aware)")
    g.add_argument("--router-config", default=None,
                   help="gateway YAML with --replicas or --ray (its endpoints are ignored; with --ray its "
                        "deployments: section lists the models)")  # fmt: skip
    g.add_argument("--db", default=None,
                   help="governance store (virtual keys, budgets, audit: see `agora keys`): sqlite:///path or "
                        "postgresql://...; puts the gateway in front even with one replica")  # fmt: skip
    r = p.add_argument_group("Ray (agora.cluster; pip install agora[ray])")
    r.add_argument("--ray", action="store_true",
                   help="run the replicas as Ray Serve deployments: placed, restarted and autoscaled by Ray, "
                        "routed by agora's gateway")  # fmt: skip
    add_arguments(r, ClusterConfig)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The engine server's whole config from the flags (or from --serve-config); ValueError names a bad one."""
    if args.serve_config is not None:
        config = ServeConfig.from_json(args.serve_config)
        # The key is never part of the JSON (argv is visible in `ps`): it comes from the environment.
        return dataclasses.replace(config, server=dataclasses.replace(config.server, api_key=args.api_key))
    names = args.served_model_name or []
    server = from_arguments(ServerConfig, args, api_key=args.api_key, served_model_aliases=tuple(names[1:]),
                            model_aliases=parse_aliases(args.model_alias))  # fmt: skip
    engine = EngineConfig(
        model=from_arguments(ModelConfig, args, model=args.model, served_model_name=names[0] if names else None),
        cache=from_arguments(CacheConfig, args),
        scheduler=from_arguments(SchedulerConfig, args),
        max_waiting_requests=args.max_waiting_requests,
        speculative_config=args.speculative_config,
    )
    return ServeConfig(engine=engine, server=server)


def serve(args: argparse.Namespace) -> int:
    try:
        config = serve_config(args)
        if args.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        cluster = from_arguments(ClusterConfig, args) if args.ray else None
    except ValueError as exc:
        print(f"agora serve: error: {exc}", file=sys.stderr)
        return 2
    if cluster is not None:
        from agora.cluster.serve import serve_ray

        return serve_ray(config, cluster, args.replicas, args.router_profile, args.router_config,
                         args.uvicorn_log_level, args.db)  # fmt: skip
    if args.replicas > 1 or args.db is not None:
        from agora.router.replicas import serve_replicas

        return serve_replicas(config, args.replicas, args.router_profile, args.router_config,
                              args.uvicorn_log_level, args.db)  # fmt: skip
    return run_server(config, args.uvicorn_log_level)


def run_server(config: ServeConfig, log_level: str = "warning") -> int:
    """One engine server in this process, until Ctrl-C or SIGTERM (then it drains: agora.http_server)."""
    import asyncio

    from agora.engine.async_engine import AsyncEngine
    from agora.engine.engine import Engine
    from agora.http_server import ENGINE_HEAD_BYTES, draining_server
    from agora.server.app import build_app

    try:
        # Built in the engine thread: it must be the only thread that runs OpenMP work (async_engine.py).
        async_engine = AsyncEngine(lambda: Engine(config.engine), config.engine.max_waiting_requests)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"agora serve: error: {exc}", file=sys.stderr)
        return 2
    app = build_app(async_engine, config.server)
    info = async_engine.model_info
    server = config.server
    logging.getLogger("agora").info("serving %s on http://%s:%d/v1 (max_model_len=%d)", info.served_model_name,
                                    server.host, server.port, info.max_model_len)  # fmt: skip

    def end_requests() -> None:  # stopping the engine ends each request it runs with an error; it joins the
        asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)  # engine thread: not on the loop

    draining_server(app, server.shutdown_timeout_s, end_requests, host=server.host, port=server.port,
                    log_level=log_level, max_head_bytes=ENGINE_HEAD_BYTES, client_timeout_s=server.client_timeout_s,
                    refused=app.state.metrics.refused).run()  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every `agora` command (deploy/'s manifests are checked against it)."""
    parser = argparse.ArgumentParser(prog="agora", description="Agora: the open LLM inference stack.")
    parser.add_argument("--version", action="version", version=f"agora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    exp = sub.add_parser("export", help="write a model (GGUF included) as a Hugging Face folder",
                         description="Write config.json, model.safetensors and tokenizer files, e.g. for vLLM.")  # fmt: skip
    exp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="packaged model name, HF folder or .gguf file")
    exp.add_argument("out_dir", help="folder to write")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    from agora.bench.cli import add_parser as add_bench
    from agora.cluster.serve import add_parser as add_status
    from agora.router.cli import add_parser as add_route
    from agora.router.dashboard.top import add_parser as add_top
    from agora.router.governance.cli import add_parsers as add_governance

    add_bench(sub)
    add_route(sub)
    add_governance(sub)
    add_status(sub)
    add_top(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args)
    if args.command == "export":
        import torch

        from agora.models.export import export_hf_folder

        try:
            out = export_hf_folder(args.model, args.out_dir, getattr(torch, args.dtype))
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"agora export: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if args.command == "route":
        from agora.router.cli import main as route_main

        return route_main(args)
    if args.command in ("keys", "tenants", "usage", "audit"):
        from agora.router.governance.cli import main as governance_main

        return governance_main(args)
    if args.command == "status":
        from agora.cluster.serve import status_main

        return status_main(args)
    if args.command == "top":
        from agora.router.dashboard.top import main as top_main

        return top_main(args)
    if args.command == "bench":
        from agora.bench.cli import main as bench_main

        return bench_main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
