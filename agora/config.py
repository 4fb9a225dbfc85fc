"""Configuration: one small frozen dataclass per part, composed at the top.

Each constructor receives only its own part. Validation happens here, at
construction, so a bad flag fails at start with a message naming it. This module
imports no part it configures (the gateway reads it without pulling in torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The packaged model `agora serve` and `LLM()` load when none is named (agora.models.catalog lists it).
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL  # packaged model name, HF folder or .gguf file
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's own context length
    served_model_name: str | None = None
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: 2 GiB on CPU, free memory on an accelerator
    gpu_memory_utilization: float = 0.9  # share of accelerator memory agora may use in all
    num_blocks: int | None = None  # overrides kv_cache_memory_bytes (tests, exact sizing)
    enable_prefix_caching: bool = True
    # auto: the model's dtype. float16 halves the cache's memory and the bytes a long-context
    # decode step reads (agora's CPU attention kernel reads fp16 directly), at fp16 rounding of K/V.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 256:
            raise ValueError("block_size must be between 1 and 256")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv cache memory must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


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


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    max_waiting_requests: int = 256  # beyond this, new requests are refused (HTTP 429)

    def __post_init__(self) -> None:
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 << 20
    api_key: str | None = None
    tool_call_parser: str | None = None  # None: the one the chat template's format calls for
    served_model_aliases: tuple[str, ...] = ()  # more names the model answers to (agents send their own)
    model_aliases: tuple[tuple[str, str], ...] = ()  # (name or glob, served name), e.g. ("claude-*", ...)
    responses_store: str | None = None  # SQLite file of stored responses; None: responses.sqlite3 in the cache
    responses_ttl_s: float = 30 * 86400.0
    responses_max: int = 100_000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.responses_ttl_s <= 0 or self.responses_max < 1:
            raise ValueError("responses_ttl_s must be > 0 and responses_max >= 1")


def parse_size(text: str) -> int:
    """'2GiB', '512M', '1e9' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
    s = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(float(s))


def parse_aliases(items: list[str]) -> tuple[tuple[str, str], ...]:
    """['claude-*=SmolLM2', ...] -> (('claude-*', 'SmolLM2'), ...); ValueError names a malformed one."""
    out = []
    for item in items:
        pattern, sep, name = item.partition("=")
        if not sep or not pattern.strip() or not name.strip():
            raise ValueError(f"model alias {item!r}: give PATTERN=NAME, e.g. 'claude-*=SmolLM2-135M-Instruct'")
        out.append((pattern.strip(), name.strip()))
    return tuple(out)
