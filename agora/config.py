"""Configuration: one small frozen dataclass per part, composed at the top.

Each constructor receives only its own part. Validation happens here, at
construction, so a bad flag fails at start with a message naming it. This module
imports no part it configures (the gateway reads it without pulling in torch).

Defaults live here and only here: a field declared with ``option(...)`` is also a
command-line flag (`add_arguments` derives it, `from_arguments` reads it back), and a
whole config travels as JSON (`to_dict` / `from_dict`), which is how `agora serve
--replicas` and `--ray` start their replicas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

# The packaged model `agora serve` and `LLM()` load when none is named (agora.models.catalog lists it).
DEFAULT_MODEL = "smollm2-135m-instruct"

DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_ACTIVATIONS = ("float32", "int8")
GGUF_WEIGHTS = ("auto", "fp32", "blocks")


def option(default: Any, help: str, *, flag: str | None = None, parse: Any = None, choices: Any = None,
           action: Any = None, metavar: str | None = None, shown: str | None = None) -> Any:  # fmt: skip
    """A config field that is also a flag of the command line (``--field-name`` unless ``flag`` says)."""
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "action": action, "metavar": metavar,
            "shown": shown}  # fmt: skip
    return field(default=default, metadata=meta)


def parse_size(text: str | int) -> int:
    """'2GiB', '512M', '1e9' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
    s = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(float(s))


def _flag_value(parse: Any, text: str) -> Any:
    """``parse(text)``, with its ValueError's message shown by argparse as the flag's error."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_aliases(items: list[str]) -> tuple[tuple[str, str], ...]:
    """['claude-*=SmolLM2', ...] -> (('claude-*', 'SmolLM2'), ...); ValueError names a malformed one."""
    out = []
    for item in items:
        pattern, sep, name = item.partition("=")
        if not sep or not pattern.strip() or not name.strip():
            raise ValueError(f"model alias {item!r}: give PATTERN=NAME, e.g. 'claude-*=SmolLM2-135M-Instruct'")
        out.append((pattern.strip(), name.strip()))
    return tuple(out)


def parse_origins(text: str) -> tuple[str, ...]:
    """Allowed browser origins: vLLM's spelling, a JSON list (``'["https://app.example.com"]'``, ``'["*"]'``),
    or the same comma-separated. Each is ``*``, ``null`` (pages opened from files) or ``scheme://host[:port]``."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ValueError(f"allowed origins {text!r}: not a JSON list") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"allowed origins {text!r}: give a JSON list of strings")
    else:
        items = text.split(",")
    return check_origins([i.strip() for i in items if i.strip()])


def check_origins(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The origins as compared (lower case, no trailing slash); ValueError names a malformed one."""
    out = []
    for item in items:
        origin = item.rstrip("/")
        scheme, sep, rest = origin.partition("://")
        if origin not in ("*", "null") and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise ValueError(f"allowed origin {item!r}: give scheme://host[:port] (no path), '*' or 'null'")
        out.append(origin.lower())
    return tuple(out)


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL  # packaged model name, HF folder or .gguf file (the positional argument)
    dtype: str = option(
        "auto", "weights and activations (auto: float32 on CPU, bfloat16 on CUDA; bfloat16 on a CPU: bf16 weights "
        "for the layers' GEMMs, fp32 activations)", choices=DTYPES)  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:1, ... (default: best available)")
    gguf_activations: str = option(
        "float32", "what a GGUF model's block layers multiply on the CPU kernels, in the steps they take (decode, "
        "draft verification, short chunks): float32 (exact fp32 math) or int8 (x quantized in blocks of 32, "
        "llama.cpp's numerics: faster, not exact)",
        choices=GGUF_ACTIVATIONS)  # fmt: skip
    gguf_weights: str = option(
        "auto", "whether a GGUF model on the CPU kernels also keeps its weights in fp32 for the GEMMs of long steps "
        "(prefill chunks): fp32 (4 bytes a weight more), blocks (the file's blocks only: a long step dequantizes a "
        "layer's weight for its GEMM; a model several times larger fits), auto (fp32 where those copies take at most "
        "40%% of the memory available, else blocks)", choices=GGUF_WEIGHTS)  # fmt: skip
    max_model_len: int | None = option(None, "context length (default: the model's)")
    served_model_name: str | None = None  # set from --served-model-name's first name
    seed: int = option(0, "seed of sampling and of random weights")
    enforce_eager: bool = option(False, "never use CUDA graphs", action="store_true")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gguf_activations not in GGUF_ACTIVATIONS:
            raise ValueError(
                f"gguf_activations must be one of {', '.join(GGUF_ACTIVATIONS)}, got {self.gguf_activations!r}"
            )
        if self.gguf_weights not in GGUF_WEIGHTS:
            raise ValueError(f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got {self.gguf_weights!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(16, "tokens per KV block")
    kv_cache_memory_bytes: int | None = option(
        None, "KV cache size, e.g. 512MiB, 4GiB (default: 2GiB on CPU, free memory on a GPU)",
        flag="--kv-cache-memory", parse=parse_size, metavar="SIZE")  # fmt: skip
    gpu_memory_utilization: float = option(0.9, "share of GPU memory agora may use, weights and KV cache together")
    num_blocks: int | None = None  # overrides kv_cache_memory_bytes (tests, exact sizing)
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of earlier prompts' shared prefixes",
                                         action=argparse.BooleanOptionalAction)  # fmt: skip
    # auto: the model's dtype (bf16 for --dtype bfloat16 on a CPU, whose activations stay fp32). float16 or
    # bfloat16 halve the cache's memory and the bytes a long-context decode step reads (agora's CPU attention
    # kernels read both directly), at their rounding of K/V.
    kv_cache_dtype: str = option("auto", "KV cache element type (auto: the model's dtype, bfloat16 with --dtype "
                                 "bfloat16; float16 or bfloat16 halve its memory and the bytes a long-context decode "
                                 "step reads, at their rounding of K/V)", choices=DTYPES)  # fmt: skip

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 256:
            raise ValueError("block_size must be between 1 and 256")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv cache memory must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The scheduler's own limits. The context length is the model's (``ModelConfig.max_model_len``, resolved
    against the model and the KV cache by the engine), handed to the scheduler as an argument."""

    max_num_seqs: int = option(64, "most requests in one batch")
    max_num_batched_tokens: int = option(2048, "token budget of one step")
    scheduling_policy: str = option("fcfs", "fcfs: requests in arrival order; priority: by each request's "
                                    "priority (lower first; vLLM's), then arrival, and a step short of KV "
                                    "blocks preempts the lowest", choices=SCHEDULING_POLICIES)  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}")


@dataclass(frozen=True, slots=True)
class StructuredOutputsConfig:
    """Grammar compilation (xgrammar) for structured outputs and tool calls."""

    cache_size: int = 256  # compiled grammars kept, least recently used dropped first
    compile_timeout_s: float = 10.0  # a request whose grammar takes longer gets a 400
    compile_threads: int = 2  # worker threads; compiles never run on the engine's step loop

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise ValueError("structured outputs cache_size must be >= 1")
        if self.compile_timeout_s <= 0:
            raise ValueError("structured outputs compile_timeout_s must be > 0")
        if self.compile_threads < 1:
            raise ValueError("structured outputs compile_threads must be >= 1")


SPEC_METHODS = ("ngram", "suffix")
# vLLM methods that need a second model (or heads trained for the target); agora drafts from the context only.
_DRAFT_MODEL_METHODS = ("eagle", "eagle3", "medusa", "mlp_speculator", "draft_model", "mtp", "deepseek_mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, spelled as vLLM's ``--speculative-config`` JSON.

    Drafts come from the context, no second model: ``ngram`` (prompt lookup: the tokens that followed the
    latest earlier occurrence of the last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens) or ``suffix``
    (SuffixDecoding: the longest earlier match of the context's suffix, in this request and in recent outputs
    of others, followed along its most frequent continuation while that stays likely; the length adapts to
    the match and to how the request's drafts have done). Verification is exact: greedy output is the same
    tokens as without speculation, and sampling keeps the target distribution.
    """

    method: str = "ngram"
    num_speculative_tokens: int | None = None  # most draft tokens a step verifies (ngram: 5, suffix: the depth)
    prompt_lookup_min: int | None = None  # ngram: shortest match (vLLM: 5 when neither is given)
    prompt_lookup_max: int | None = None  # ngram: longest match tried first
    suffix_decoding_max_tree_depth: int = 24  # suffix: longest context match (and draft) considered
    suffix_decoding_max_cached_requests: int = 10000  # suffix: finished outputs kept for drafting others
    suffix_decoding_max_spec_factor: float = 1.0  # suffix: draft at most factor x match length tokens
    suffix_decoding_min_token_prob: float = 0.1  # suffix: stop drafting where the continuation gets unlikelier

    def __post_init__(self) -> None:
        if self.method in _DRAFT_MODEL_METHODS:
            raise ValueError(f"speculative_config.method {self.method!r} needs a draft model, which agora does not "
                             f"run; agora drafts from the context: {' or '.join(SPEC_METHODS)}")  # fmt: skip
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        k = self.num_speculative_tokens
        if k is None:
            k = 5 if self.method == "ngram" else self.suffix_decoding_max_tree_depth
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        object.__setattr__(self, "num_speculative_tokens", k)
        if not 1 <= k <= 64:
            raise ValueError(f"speculative_config.num_speculative_tokens must be between 1 and 64, got {k}")
        if not 1 <= lo <= hi <= 64:  # type: ignore[operator]
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max <= 64")
        if not 1 <= self.suffix_decoding_max_tree_depth <= 256:
            raise ValueError("speculative_config.suffix_decoding_max_tree_depth must be between 1 and 256")
        if self.suffix_decoding_max_cached_requests < 0:
            raise ValueError("speculative_config.suffix_decoding_max_cached_requests must be >= 0")
        if self.suffix_decoding_max_spec_factor <= 0:
            raise ValueError("speculative_config.suffix_decoding_max_spec_factor must be > 0")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ValueError("speculative_config.suffix_decoding_min_token_prob must be in [0, 1]")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """From the flag's JSON text or a dict; ValueError names an unknown key or a bad value."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 5}')  # fmt: skip
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {', '.join(unknown)} (agora knows {', '.join(sorted(names))})"
            )
        if "method" not in value:
            raise ValueError("speculative_config needs a method: ngram or suffix")
        return cls(**value)


SPEC_AUTO = "auto"  # --speculative-config's default: suffix where it was measured never to lose (CPU), else off
_SPEC_OFF = ("off", "none", "null")


def speculative_setting(value: Any) -> SpeculativeConfig | str | None:
    """``--speculative-config``'s value: ``"auto"``, off (``None``, ``"off"``, ``"none"``, ``"null"``), or vLLM's
    JSON text or dict. ValueError names a bad one."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word == SPEC_AUTO:
        return SPEC_AUTO
    if word in _SPEC_OFF:
        return None
    return SpeculativeConfig.parse(value)


def resolve_speculative(setting: SpeculativeConfig | str | None, device_type: str) -> SpeculativeConfig | None:
    """What the engine runs: ``"auto"`` is ``suffix`` on a CPU, where agora's benchmarks show it gaining on agent
    workloads and losing nothing on the others (benchmarks/results/spec-default), and off on accelerators, where
    that has not been measured."""
    if setting == SPEC_AUTO:
        return SpeculativeConfig(method="suffix") if device_type == "cpu" else None
    assert setting is None or isinstance(setting, SpeculativeConfig)
    return setting


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    max_waiting_requests: int = option(256, "requests waiting beyond the batch; more are refused with a 429")
    speculative_config: SpeculativeConfig | str | None = option(
        SPEC_AUTO, 'speculative decoding as vLLM spells it, e.g. \'{"method": "ngram", "num_speculative_tokens": 5, '
        '"prompt_lookup_max": 5, "prompt_lookup_min": 2}\' or \'{"method": "suffix"}\'; "off" turns it off; '
        'default "auto": suffix on a CPU, off on a GPU',
        parse=lambda text: _flag_value(speculative_setting, text), metavar="JSON")  # fmt: skip

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config", speculative_setting(self.speculative_config))
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")


# --reasoning-parser: auto (from the chat template), none (never split), and vLLM's names of the <think> format
REASONING_PARSERS = ("auto", "none", "qwen3", "deepseek_r1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "bind address (default: 127.0.0.1, this machine only)")
    port: int = option(8000, "port")
    max_body_bytes: int = option(8 << 20, "largest request body accepted (413 beyond)", parse=parse_size,
                                 metavar="SIZE", shown="8MiB")  # fmt: skip
    api_key: str | None = None  # --api-key, default $AGORA_API_KEY (read by the CLI through agora.envs)
    tool_call_parser: str | None = option(
        None, "the tool-call format to read and enforce (default: from the chat template; hermes for templates "
        "that know no tools)")  # fmt: skip
    reasoning_parser: str = option(
        "auto", "how a reasoning model's thinking (<think>...</think>) is told from its answer: auto (when the chat "
        "template writes <think>), none (never: the thinking stays in the answer), or vLLM's qwen3 / deepseek_r1 "
        "(the same tags, whatever the template says)")  # fmt: skip
    served_model_aliases: tuple[str, ...] = ()  # more names the model answers to (agents send their own)
    model_aliases: tuple[tuple[str, str], ...] = ()  # (name or glob, served name), e.g. ("claude-*", ...)
    responses_store: str | None = option(
        None, "SQLite file of stored Responses (default: responses.sqlite3 in the cache folder; the replicas of "
        "one machine share it)", metavar="PATH")  # fmt: skip
    responses_ttl_s: float = 30 * 86400.0
    responses_max: int = 100_000
    shutdown_timeout_s: float = option(
        30.0, "on SIGTERM or Ctrl-C, how long requests in flight have to finish (new ones are refused); then "
        "each ends with an error in its API's shape", flag="--shutdown-timeout", metavar="SECONDS")  # fmt: skip
    allowed_origins: tuple[str, ...] = option(
        (), "browser pages from these origins may call the server (CORS), as vLLM spells it: a JSON list, e.g. "
        '\'["https://app.example.com"]\' or \'["*"]\'; default none: other sites\' pages are refused (403)',
        parse=lambda text: _flag_value(parse_origins, text), metavar="JSON")  # fmt: skip
    client_timeout_s: float = option(
        60.0, "how long a client may take to send a request's headers, and the longest pause in its body; slower "
        "connections are closed (408)", flag="--client-timeout", metavar="SECONDS")  # fmt: skip

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if not 0 <= self.shutdown_timeout_s <= 3600:
            raise ValueError(f"shutdown timeout must be between 0 and 3600 seconds, got {self.shutdown_timeout_s}")
        object.__setattr__(self, "allowed_origins", check_origins(self.allowed_origins))
        if not 0 < self.client_timeout_s <= 3600:
            raise ValueError(f"client timeout must be above 0 and at most 3600 seconds, got {self.client_timeout_s}")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser {self.reasoning_parser!r} is not one of "
                             f"{', '.join(REASONING_PARSERS)}")  # fmt: skip
        if self.responses_ttl_s <= 0 or self.responses_max < 1:
            raise ValueError("responses_ttl_s must be > 0 and responses_max >= 1")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one engine server needs: what `agora serve` builds from its flags, and what a replica is
    started from (as JSON)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return from_dict(cls, json.loads(text))


@dataclass(frozen=True)
class ClusterConfig:
    """`agora serve --ray`: engine replicas as Ray Serve deployments (agora.cluster)."""

    address: str | None = option(None, "Ray cluster to join (auto, or HOST:PORT of its head); default: start a "
                                 "local Ray instance", flag="--address")  # fmt: skip
    min_replicas: int | None = option(None, "autoscaling: fewest replicas (with --max-replicas)")
    max_replicas: int | None = option(None, "autoscaling: most replicas (with --min-replicas)")
    num_cpus_per_replica: float = option(1.0, "CPUs Ray reserves for each replica (its engine uses that many threads)")
    num_gpus_per_replica: float = option(0.0, "GPUs Ray reserves for each replica")
    target_ongoing_requests: float = option(
        4.0, "autoscaling: requests (running + waiting in the engine) each replica should carry")  # fmt: skip
    upscale_delay_s: float = option(5.0, "autoscaling: how long the load must stay above target before adding")
    downscale_delay_s: float = option(30.0, "autoscaling: how long the load must stay below target before removing")
    app_name: str = option("agora", "the Ray Serve application's name", flag="--ray-app-name")

    def __post_init__(self) -> None:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give --min-replicas and --max-replicas together")
        if self.min_replicas is not None and not 0 < self.min_replicas <= self.max_replicas:  # type: ignore[operator]
            raise ValueError("need 0 < --min-replicas <= --max-replicas")
        if self.num_cpus_per_replica < 0 or self.num_gpus_per_replica < 0:
            raise ValueError("--num-cpus-per-replica and --num-gpus-per-replica must be >= 0")
        if self.target_ongoing_requests <= 0:
            raise ValueError("--target-ongoing-requests must be > 0")


# -- flags and JSON from the fields --------------------------------------------------------


def _flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _value_type(cls: type, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  overrides: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
    """One flag per ``option`` field of ``cls``; its default, help and check are the field's own."""
    for f in _flag_fields(cls):
        m = {**f.metadata, **(overrides or {}).get(f.name, {})}
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        shown = m["shown"] if m["shown"] is not None else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default}
        if m["action"] is not None:
            kwargs["action"] = m["action"]
            kwargs["help"] = m["help"]
        else:
            kwargs["type"] = m["parse"] or _value_type(cls, f)
            kwargs["help"] = m["help"] if shown is None or "default" in m["help"] else f"{m['help']} (default: {shown})"
            if m["choices"] is not None:
                kwargs["choices"] = m["choices"]
            if m["metavar"] is not None:
                kwargs["metavar"] = m["metavar"]
        parser.add_argument(flag, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """``cls`` from the flags `add_arguments` made (plus ``fixed`` fields); ValueError names a bad value."""
    values = {f.name: getattr(args, f.name) for f in _flag_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **fixed})


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The config ``cls`` from `to_dict`'s output; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def with_options(config: ServeConfig, options: dict[str, Any], where: str = "options") -> ServeConfig:
    """``config`` with fields set by their names, in whichever part owns them (``max_num_seqs: 32``,
    ``kv_cache_memory_bytes: 512MiB``, ``served_model_name: smol``): how a YAML deployment overrides the
    command line. ValueError names an unknown or bad key."""
    engine, server = config.engine, config.server
    parts: dict[str, Any] = {"model": engine.model, "cache": engine.cache, "scheduler": engine.scheduler,
                             "structured": engine.structured, "server": server}  # fmt: skip
    top: dict[str, Any] = {}
    for key, value in options.items():
        owner = next((p for p, c in parts.items() if key in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None and key in ("max_waiting_requests", "speculative_config"):
            top[key] = value
            continue
        if owner is None or key == "api_key":
            raise ValueError(f"{where}.{key}: not an engine or server option")
        f = next(f for f in dataclasses.fields(parts[owner]) if f.name == key)
        parse = f.metadata.get("parse")
        if parse is not None and isinstance(value, str):
            value = parse(value)
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        try:
            parts[owner] = dataclasses.replace(parts[owner], **{key: value})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}.{key}: {exc}") from None
    server = parts.pop("server")
    return ServeConfig(engine=dataclasses.replace(engine, **{k: parts[k] for k in parts}, **top), server=server)
