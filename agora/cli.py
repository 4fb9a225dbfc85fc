"""The `agora` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from agora import __version__, envs
from agora.config import (
    DEFAULT_MODEL,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    parse_aliases,
    parse_size,
)
from agora.models.catalog import CATALOG


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API",
                       description="Serve a model over an OpenAI-compatible HTTP API.")  # fmt: skip
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF model folder, .gguf file, or packaged model ({', '.join(CATALOG)}); "
                        f"default: {DEFAULT_MODEL}")  # fmt: skip
    server, model, cache, sched, engine = (
        ServerConfig(),
        ModelConfig(),
        CacheConfig(),
        SchedulerConfig(),
        EngineConfig(),
    )
    p.add_argument("--host", default=server.host, help=f"bind address (default: {server.host}, this machine only)")
    p.add_argument("--port", type=int, default=server.port)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model id(s) the API answers to; the first is the one it reports")  # fmt: skip
    p.add_argument("--model-alias", action="append", default=[], metavar="PATTERN=NAME",
                   help="also answer to model names matching PATTERN (a name or a glob such as 'claude-*'); "
                        "repeatable")  # fmt: skip
    p.add_argument("--api-key", default=envs.api_key(),
                   help="require this bearer token on /v1 endpoints (default: $AGORA_API_KEY)")  # fmt: skip
    p.add_argument("--dtype", default=model.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=model.device, help="cpu, cuda, cuda:1, ... (default: best available)")
    p.add_argument(
        "--max-model-len", type=int, default=model.max_model_len, help="context length (default: the model's)"
    )
    p.add_argument("--max-num-seqs", type=int, default=sched.max_num_seqs, help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=sched.max_num_batched_tokens,
                   help="token budget of one step")  # fmt: skip
    p.add_argument("--max-waiting-requests", type=int, default=engine.max_waiting_requests, help="beyond this, 429")
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache size, e.g. 512MiB, 4GiB (default: 2GiB on CPU, free memory on a GPU)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=cache.gpu_memory_utilization,
                   help="share of GPU memory agora may use, weights and KV cache together")  # fmt: skip
    p.add_argument("--block-size", type=int, default=cache.block_size, help="tokens per KV block")
    p.add_argument("--kv-cache-dtype", default=cache.kv_cache_dtype, choices=["auto", "float32", "float16", "bfloat16"],
                   help="KV cache element type (auto: the model's dtype; float16 halves its memory and the "
                   "bytes a long-context decode step reads, at fp16 rounding of K/V)")  # fmt: skip
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=cache.enable_prefix_caching
    )
    p.add_argument("--max-body-bytes", default=f"{server.max_body_bytes >> 20}MiB",
                   help="largest request body accepted (413 beyond)")  # fmt: skip
    p.add_argument("--seed", type=int, default=model.seed)
    from agora.openai.tool_parsers import PARSERS

    p.add_argument("--tool-call-parser", default=server.tool_call_parser, choices=sorted(PARSERS),
                   help="the tool-call format to read and enforce (default: from the chat template; hermes for "
                        "templates that know no tools)")  # fmt: skip
    p.add_argument("--responses-store", default=server.responses_store, metavar="PATH",
                   help="SQLite file of stored Responses (default: responses.sqlite3 in the cache folder; the "
                        "replicas of one machine share it)")  # fmt: skip
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool_choice auto is always available")  # fmt: skip
    p.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    p.add_argument("--uvicorn-log-level", default="warning")
    p.add_argument("--replicas", type=int, default=1,
                   help="engine processes behind one gateway on --host:--port (default 1: no gateway)")  # fmt: skip
    p.add_argument("--router-profile", default=None, help="gateway profile with --replicas (default prefix-aware)")
    p.add_argument("--router-config", default=None, help="gateway YAML with --replicas (its endpoints are ignored)")
    p.add_argument("--db", default=None,
                   help="governance store (virtual keys, budgets, audit: see `agora keys`): sqlite:///path or "
                        "postgresql://...; puts the gateway in front even with one replica")  # fmt: skip


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    if args.replicas < 1:
        print("agora serve: error: --replicas must be at least 1", file=sys.stderr)
        return 2
    if args.replicas > 1 or args.db is not None:
        from agora.router.replicas import serve_replicas

        try:
            aliases = parse_aliases(args.model_alias)
        except ValueError as exc:
            print(f"agora serve: error: {exc}", file=sys.stderr)
            return 2
        return serve_replicas(args.model, argv[argv.index("serve") + 1 :], args.replicas, args.host, args.port,
                              args.api_key, args.router_profile, args.router_config, args.uvicorn_log_level,
                              aliases, args.db)  # fmt: skip

    import uvicorn

    from agora.engine.async_engine import AsyncEngine
    from agora.engine.engine import Engine
    from agora.engine.scheduler import SchedulerConfig
    from agora.server.app import build_app

    try:
        names = args.served_model_name or []
        server = ServerConfig(host=args.host, port=args.port, max_body_bytes=parse_size(args.max_body_bytes),
                              api_key=args.api_key, tool_call_parser=args.tool_call_parser,
                              served_model_aliases=tuple(names[1:]), model_aliases=parse_aliases(args.model_alias),
                              responses_store=args.responses_store)  # fmt: skip
        config = EngineConfig(
            model=ModelConfig(
                model=args.model,
                dtype=args.dtype,
                device=args.device,
                max_model_len=args.max_model_len,
                served_model_name=names[0] if names else None,
                seed=args.seed,
                enforce_eager=args.enforce_eager,
            ),  # fmt: skip
            cache=CacheConfig(
                block_size=args.block_size,
                kv_cache_memory_bytes=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching,
                kv_cache_dtype=args.kv_cache_dtype,
            ),  # fmt: skip
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
            ),  # fmt: skip
            max_waiting_requests=args.max_waiting_requests,
        )
        # Built in the engine thread: it must be the only thread that runs OpenMP work (async_engine.py).
        async_engine = AsyncEngine(lambda: Engine(config), config.max_waiting_requests)
        engine = async_engine.engine
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"agora serve: error: {exc}", file=sys.stderr)
        return 2
    app = build_app(async_engine, server)
    logging.getLogger("agora").info(
        "serving %s on http://%s:%d/v1 (max_model_len=%d)",
        engine.served_model_name,
        server.host,
        server.port,
        engine.max_model_len,
    )
    uvicorn.run(app, host=server.host, port=server.port, log_level=args.uvicorn_log_level,
                timeout_graceful_shutdown=30)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
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
    from agora.router.cli import add_parser as add_route
    from agora.router.governance.cli import add_parsers as add_governance

    add_bench(sub)
    add_route(sub)
    add_governance(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args, argv)
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
    if args.command == "bench":
        from agora.bench.cli import main as bench_main

        return bench_main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
