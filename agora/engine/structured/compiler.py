"""Grammar compilation for structured outputs, off the step loop, behind a bounded LRU.

::

    server: await compile(spec) ──▶ LRU hit ──────────────────────────────▶ Constraint
                                └─▶ worker thread: xgrammar compile ─┬─▶ Constraint (cached)
                                                                     └─▶ GrammarError (a 400)
    engine: add_request(..., constraint) ──▶ one GrammarState per sequence

The tokenizer's vocabulary is read once, in the worker, as the engine starts, so the
first structured request does not pay for it and the step loop never waits for a
compile (xgrammar releases the GIL while it compiles).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agora.config import StructuredOutputsConfig
from agora.engine.sampling import StructuredOutputsParams
from agora.engine.structured.endings import (
    ChoiceEnding,
    FormatEnding,
    JsonSchemaEnding,
    TooLong,
    Unsatisfiable,
    Unsupported,
    grammar_alphabet,
    search_ending,
)
from agora.schemas import MAX_SCHEMA_DEPTH, nesting_depth, schema_problem

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The constraint cannot be compiled (invalid, unsatisfiable, too large, too slow): a client error."""


@dataclass(frozen=True, slots=True)
class Vocab:
    """What a grammar state needs of the tokenizer: each token's bytes, and how to spell an ending."""

    token_bytes: list[bytes]
    byte_tokens: dict[int, int]  # a single byte -> a token that is exactly that byte
    special: frozenset[int]  # special tokens: a grammar never accepts them as text
    encode: Any  # str -> list[int], no special tokens


@dataclass(frozen=True, slots=True)
class Constraint:
    """A compiled constraint, shared by every sequence that uses it."""

    spec: StructuredOutputsParams
    grammar: Any  # xgrammar.CompiledGrammar
    ending: JsonSchemaEnding | FormatEnding | ChoiceEnding | None  # None: search the grammar
    alphabet: list[str]  # characters worth trying when searching this grammar
    vocab: Vocab


def _clean(exc: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location."""
    text = str(exc).strip()
    text = re.sub(r"^\[[0-9:]+\]\s*\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


def _leaf_schemas(node: Any, out: dict[str, dict[str, Any]]) -> None:
    """Every string schema with a pattern or format: their endings are searched on their own grammar."""
    if isinstance(node, dict):
        if ("pattern" in node or "format" in node) and node.get("type", "string") == "string":
            leaf = {k: node[k] for k in ("type", "pattern", "format", "minLength", "maxLength") if k in node}
            leaf["type"] = "string"
            out[json.dumps(leaf, sort_keys=True)] = leaf
        for v in node.values():
            _leaf_schemas(v, out)
    elif isinstance(node, list):
        for v in node:
            _leaf_schemas(v, out)


class _LeafSolver:
    """Endings of pattern / format strings, each searched on the string's own small grammar."""

    def __init__(self, grammars: dict[str, Any]) -> None:
        self.grammars = {k: (g, grammar_alphabet(str(g.grammar))) for k, g in grammars.items()}

    def __call__(self, schema: dict[str, Any], partial: str) -> str | None:
        import xgrammar as xgr

        leaf = {k: schema[k] for k in ("type", "pattern", "format", "minLength", "maxLength") if k in schema}
        leaf["type"] = "string"
        found = self.grammars.get(json.dumps(leaf, sort_keys=True))
        if found is None:
            return None
        grammar, alphabet = found
        matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
        if partial and not matcher.accept_string(partial):
            return None
        return search_ending(matcher, alphabet, max_nodes=2000)


class GrammarCompiler:
    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 config: StructuredOutputsConfig | None = None) -> None:  # fmt: skip
        self.config = config or StructuredOutputsConfig()
        self._pool = ThreadPoolExecutor(self.config.compile_threads, thread_name_prefix="agora-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutputsParams, Constraint] = OrderedDict()
        self._inflight: dict[StructuredOutputsParams, Future[Constraint]] = {}
        self.hits = self.misses = 0
        self._setup = self._pool.submit(self._build, hf_tokenizer, vocab_size, stop_token_ids)

    def _build(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> tuple[Any, Vocab]:
        import xgrammar as xgr

        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        token_bytes = [bytes(b) for b in info.decoded_vocab]
        special = set(info.special_token_ids)
        byte_tokens: dict[int, int] = {}
        for tid, b in enumerate(token_bytes):
            if len(b) == 1 and tid not in special:
                byte_tokens.setdefault(b[0], tid)

        def encode(text: str) -> list[int]:
            return hf_tokenizer.encode(text, add_special_tokens=False)

        logger.info("structured outputs ready (vocabulary read in %.1fs)", time.perf_counter() - t0)
        return compiler, Vocab(token_bytes, byte_tokens, frozenset(special), encode)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def compile(self, spec: StructuredOutputsParams) -> Future[Constraint]:
        """The compiled constraint (at once from the cache, else from a worker thread)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                done: Future[Constraint] = Future()
                done.set_result(hit)
                return done
            pending = self._inflight.get(spec)
            if pending is not None:
                return pending
            self.misses += 1
            future = self._pool.submit(self._compile, spec)
            self._inflight[spec] = future
        future.add_done_callback(lambda f: self._store(spec, f))
        return future

    def _store(self, spec: StructuredOutputsParams, future: Future[Constraint]) -> None:
        with self._lock:
            self._inflight.pop(spec, None)
            if future.cancelled() or future.exception() is not None:
                return
            self._cache[spec] = future.result()
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def _compile(self, spec: StructuredOutputsParams) -> Constraint:

        compiler, vocab = self._setup.result()
        ending: JsonSchemaEnding | FormatEnding | ChoiceEnding | None = None
        try:
            if spec.json is not None or spec.json_object:
                schema = json.loads(spec.json) if spec.json is not None else {"type": "object"}
                strict = spec.strict and spec.json is not None
                _check_schema(schema)
                grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
                ending = JsonSchemaEnding(schema, strict=strict, leaf=self._leaves(compiler, schema))
            elif spec.regex is not None:
                grammar = compiler.compile_regex(spec.regex)
            elif spec.choice is not None:
                grammar = compiler.compile_grammar(_choice_ebnf(spec.choice))
                ending = ChoiceEnding(list(spec.choice))
            elif spec.grammar is not None:
                grammar = compiler.compile_grammar(spec.grammar)
            else:
                assert spec.structural_tag is not None
                tag = json.loads(spec.structural_tag)
                if nesting_depth(tag, MAX_SCHEMA_DEPTH * 2) > MAX_SCHEMA_DEPTH * 2:
                    raise GrammarError("the structural tag is nested too deeply")
                for node in _schemas_in(tag):
                    _check_schema(node)
                grammar = compiler.compile_structural_tag(json.dumps(tag))
                fmt = tag.get("format") if isinstance(tag, dict) else None
                if isinstance(fmt, dict):
                    ending = FormatEnding(fmt, leaf=self._leaves(compiler, tag))
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(_clean(exc)) from None
        constraint = Constraint(spec, grammar, ending, grammar_alphabet(str(grammar.grammar)), vocab)
        _check_satisfiable(constraint)
        return constraint

    @staticmethod
    def _leaves(compiler: Any, schema: Any) -> _LeafSolver | None:
        leaves: dict[str, dict[str, Any]] = {}
        _leaf_schemas(schema, leaves)
        if not leaves:
            return None
        return _LeafSolver({k: compiler.compile_json_schema(json.dumps(v), any_whitespace=False)
                            for k, v in leaves.items()})  # fmt: skip


def _schemas_in(tag: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(tag, dict):
        if tag.get("type") == "json_schema" and "json_schema" in tag:
            out.append(tag["json_schema"])
        for v in tag.values():
            out.extend(_schemas_in(v))
    elif isinstance(tag, list):
        for v in tag:
            out.extend(_schemas_in(v))
    return out


def _check_schema(schema: Any) -> None:
    """A valid JSON Schema, not nested too deeply."""
    problem = schema_problem(schema)
    if problem is not None:
        raise GrammarError(problem)


def _choice_ebnf(options: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)


def _check_satisfiable(c: Constraint) -> None:
    """Refuse a constraint no output can satisfy: its smallest output is looked for once, here."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(c.grammar)
    if c.ending is not None:
        try:
            first = c.ending.ending("")
        except TooLong:
            return  # its smallest output is huge, but it has one
        check = matcher.fork()
        if first is not None and check.accept_string(first) and check.is_completed():
            return
    if isinstance(c.ending, JsonSchemaEnding):
        try:
            c.ending.min_value(c.ending.root)
        except Unsatisfiable as exc:
            raise GrammarError(f"no output can satisfy this constraint: {exc}") from None
        except Unsupported:
            pass
    if matcher.is_completed():
        return
    bitmask = xgr.allocate_token_bitmask(1, c.grammar.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    if not bool((bitmask != 0).any()):
        raise GrammarError("no output can satisfy this constraint")
