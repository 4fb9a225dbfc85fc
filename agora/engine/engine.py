"""The synchronous engine: ``step()`` = schedule -> run the model -> update.

A request with ``n > 1`` fans out into n sequences that share the prompt (and,
through the prefix cache, its KV blocks); outputs carry the sequence's index.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from agora import envs
from agora.config import SPEC_AUTO, EngineConfig, resolve_speculative
from agora.engine.device import kv_cache_budget, pick_device, pick_kv_dtype, pick_precision
from agora.engine.kv_cache import KVCacheManager
from agora.engine.request import Request, RequestStatus
from agora.engine.runner import ModelRunner, RunnerOutput, kv_bytes_per_block
from agora.engine.sampler import TokenLogprobs
from agora.engine.sampling import ParamError, SamplingParams
from agora.engine.scheduler import Scheduler, SchedulerOutput
from agora.engine.spec import Proposer, SpecStats, build_proposer
from agora.engine.spec.policy import DraftPolicy
from agora.engine.structured import Constraint, GrammarCompiler, GrammarError, GrammarState
from agora.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from agora.models.catalog import resolve_model
from agora.models.loader import inspect_model, load_model

logger = logging.getLogger(__name__)


def out_of_vocabulary(token_ids: list[int], vocab_size: int) -> int | None:
    """The first id in ``token_ids`` that is no token of a ``vocab_size`` vocabulary (min and max first, in C)."""
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return None
    return next(t for t in token_ids if not 0 <= t < vocab_size)


def check_request(vocab_size: int, max_model_len: int, has_grammars: bool, prompt_token_ids: list[int],
                  params: SamplingParams) -> None:  # fmt: skip
    """ParamError if a request can never run on a model of this vocabulary and context length: the engine's
    check, and a remote engine's client's (agora.cluster.client), which must refuse before submitting."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ParamError("prompt", "the prompt is empty")
    if n >= max_model_len:  # first: a prompt of a million ids is not walked to be refused
        raise ParamError("prompt",
            f"the prompt has {n} tokens, but this model's context length is {max_model_len}; shorten the prompt"
        )  # fmt: skip
    if (bad := out_of_vocabulary(prompt_token_ids, vocab_size)) is not None:
        raise ParamError("prompt", f"token id {bad} is out of the vocabulary (0..{vocab_size - 1})")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ParamError("max_tokens",
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{n + params.max_tokens} tokens ({n} in the prompt and {params.max_tokens} for max_tokens); "
            "reduce the prompt or max_tokens"
        )  # fmt: skip
    for t in params.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise ParamError("stop_token_ids", f"stop_token_ids: {t} is out of the vocabulary")
    for t in params.logit_bias or {}:
        if not 0 <= t < vocab_size:
            raise ParamError("logit_bias", f"logit_bias: token id {t} is out of the vocabulary")
    if params.allowed_token_ids is not None:
        if len(params.allowed_token_ids) > vocab_size:
            raise ParamError("allowed_token_ids", f"allowed_token_ids lists more ids than the vocabulary has "
                                                  f"({vocab_size})")  # fmt: skip
        if (bad := out_of_vocabulary(params.allowed_token_ids, vocab_size)) is not None:
            raise ParamError("allowed_token_ids", f"allowed_token_ids: token id {bad} is out of the vocabulary")
    for ids in params.bad_words_token_ids:
        if (bad := out_of_vocabulary(ids, vocab_size)) is not None:
            raise ParamError("bad_words", f"bad_words_token_ids: token id {bad} is out of the vocabulary")
    if params.structured_outputs is not None and not has_grammars:
        raise ParamError("structured_outputs", "structured outputs need a tokenizer, and this model has none")


def check_priority(priority_scheduling: bool, priority: int) -> None:
    """ParamError for a priority an engine that schedules first come, first served cannot honour: the engine's
    check, and a remote engine's client's."""
    if priority != 0 and not priority_scheduling:
        raise ParamError("priority", "priority scheduling is not enabled on this server (agora serve "
                                     "--scheduling-policy priority); the gateway's tenant priority bands order "
                                     "requests across tenants")  # fmt: skip


def tokenize_bad_words(tokenizer: Tokenizer | None, params: SamplingParams) -> None:
    """``params.bad_words`` into ``params.bad_words_token_ids`` (once), their bounds checked: the engine's step, and a
    remote engine's client's (which has the tokenizer, and must refuse before submitting)."""
    if params.bad_words and not params.bad_words_token_ids:
        if tokenizer is None:
            raise ParamError("bad_words", "bad_words need a tokenizer, and this model has none")
        params.bad_words_token_ids = bad_words_token_ids(tokenizer, params.bad_words)
        params.validate()  # their tokens' bounds


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's tokens as it starts the output and as it follows a space (vLLM's two spellings), each once."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


@dataclass
class RequestOutput:
    """What one step produced for one sequence (deltas, not totals)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Per token, where its text begins in the sequence's decoded text (characters): a token that ends
    # mid-character adds nothing until the one that completes it, and held-back stop-string text
    # counts where it was decoded, so offsets do not depend on how tokens were grouped into steps.
    # Empty without a tokenizer.
    text_offsets: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # With ``prompt_logprobs``, on a sequence's first output: prompt tokens 1.. (the first has none)
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_aborted: int = 0
    spec: SpecStats | None = None  # speculative decoding's counters, when it is on
    # Engine steps and their seconds by kind (STEP_KINDS): where the engine's time goes, e.g. how much of a
    # run is prompt chunks, which drafts cannot shorten.
    steps: dict[str, int] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)


# A step that computes any prompt chunk is "prefill" (decoding sequences may share it); else "verify" if
# some sequence verifies drafts, else "decode".
STEP_KINDS = ("prefill", "decode", "verify")


@dataclass
class _Sequence:
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer | None
    counted_prompt: bool = False


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        threads = envs.num_threads()
        if threads:
            torch.set_num_threads(threads)
        path, default_name = resolve_model(config.model.model)
        files = inspect_model(path)
        self.served_model_name = config.model.served_model_name or default_name
        self.device = pick_device(config.model.device)
        precision = pick_precision(config.model.dtype, self.device)
        self.dtype = precision.dtype
        torch.manual_seed(config.model.seed)
        t0 = time.perf_counter()
        int8 = config.model.gguf_activations == "int8"
        model = load_model(files, self.dtype, self.device, gemm_dtype=precision.gemm_dtype, int8_activations=int8,
                           gguf_weights=config.model.gguf_weights)  # fmt: skip
        logger.info("loaded %s (%s) on %s in %.1fs", path, files.architecture, self.device, time.perf_counter() - t0)
        self.tokenizer = Tokenizer(files.tokenizer_dir, files.eos_token_ids) if files.tokenizer_dir else None
        self.eos_token_ids = (
            self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset(files.eos_token_ids)
        )
        self.vocab_size = model.config.vocab_size  # type: ignore[union-attr]

        cache = config.cache
        self.kv_dtype = pick_kv_dtype(cache.kv_cache_dtype, precision)
        block_bytes = kv_bytes_per_block(model, cache.block_size, self.kv_dtype)
        if cache.num_blocks is None:
            budget = kv_cache_budget(self.device, cache.kv_cache_memory_bytes, cache.gpu_memory_utilization)
            num_blocks = budget // block_bytes
        else:
            num_blocks = cache.num_blocks
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one block needs {block_bytes} bytes")
        capacity = num_blocks * cache.block_size
        model_max = files.max_position_embeddings
        max_len = config.model.max_model_len or model_max
        if max_len > model_max:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length {model_max}")
        if max_len > capacity:
            if config.model.max_model_len:
                raise ValueError(f"max_model_len {max_len} does not fit the KV cache ({capacity} tokens); raise it")
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache", max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.num_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks x %d tokens, %s (%.0f MiB)",
            num_blocks, cache.block_size, str(self.kv_dtype).removeprefix("torch."), num_blocks * block_bytes / 2**20,
        )  # fmt: skip

        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(
            model, num_blocks, cache.block_size, self.device, self.dtype,
            max_num_seqs=config.scheduler.max_num_seqs, max_model_len=max_len,
            enforce_eager=config.model.enforce_eager, kv_dtype=self.kv_dtype, bf16_attention=precision.bf16_attention,
        )  # fmt: skip
        self.model = model
        # Structured outputs: the vocabulary is read in a worker thread while the engine starts.
        self.grammars = (
            GrammarCompiler(self.tokenizer.hf, self.vocab_size, sorted(self.eos_token_ids), config.structured)
            if self.tokenizer is not None else None
        )  # fmt: skip
        spec = resolve_speculative(config.speculative_config, self.device.type)
        self.proposer: Proposer | None = build_proposer(spec) if spec is not None else None
        self.policy = DraftPolicy() if spec is not None else None
        self.spec_stats = SpecStats()
        self.max_draft_tokens = spec.num_speculative_tokens if spec is not None else 0
        if spec is not None:
            auto = config.speculative_config == SPEC_AUTO
            how = " (the default on a CPU; --speculative-config off turns it off)" if auto else ""
            logger.info("speculative decoding: %s, up to %d draft tokens a step%s", spec.method,
                        spec.num_speculative_tokens, how)  # fmt: skip
        self.sequences: dict[str, _Sequence] = {}
        self.children: dict[str, list[str]] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_aborted = 0
        self.steps = dict.fromkeys(STEP_KINDS, 0)
        self.step_seconds = dict.fromkeys(STEP_KINDS, 0.0)

    # -- requests ------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParamError (a client error naming the parameter) if the request can never run. Tokenizes
        ``params.bad_words`` into ``params.bad_words_token_ids`` (once)."""
        tokenize_bad_words(self.tokenizer, params)
        check_request(self.vocab_size, self.max_model_len, self.grammars is not None, prompt_token_ids, params)

    @property
    def priority_scheduling(self) -> bool:
        return self.scheduler.by_priority

    def check_priority(self, priority: int) -> None:
        check_priority(self.priority_scheduling, priority)

    def compile_grammar(self, params: SamplingParams) -> Constraint:
        """Compile a request's constraint here and now (the offline API; the server compiles off the
        step loop through ``grammars.compile``). Raises ParamError for a constraint that cannot work."""
        assert self.grammars is not None and params.structured_outputs is not None
        try:
            return self.grammars.compile(params.structured_outputs).result()
        except GrammarError as exc:
            raise ParamError("structured_outputs", str(exc)) from None

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        constraint: Constraint | None = None,
        priority: int = 0,
    ) -> None:
        """``constraint``: the compiled ``params.structured_outputs`` (compiled here if not given); ``priority``:
        lower is served first, under the priority scheduling policy (any other value is refused under fcfs)."""
        self.validate(prompt_token_ids, params)
        self.check_priority(priority)
        if request_id in self.children:
            raise ValueError(f"duplicate request id {request_id!r}")
        if params.structured_outputs is not None and constraint is None:
            constraint = self.compile_grammar(params)
        stop_ids = sorted(self.eos_token_ids | set(params.stop_token_ids))
        ids = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=(params.seed + i) % (2**63))
            child_id = f"{request_id}#{i}"
            req = Request(
                child_id,
                list(prompt_token_ids),
                child_params,
                eos_token_ids=self.eos_token_ids,
                max_total_tokens=self.max_model_len,
                cache_salt=cache_salt,
                priority=priority,
            )
            if constraint is not None:
                req.grammar = GrammarState(constraint, stop_ids)  # one matcher per sequence
            detok = IncrementalDetokenizer(self.tokenizer, child_params) if self.tokenizer else None
            self.sequences[child_id] = _Sequence(request_id, i, detok)
            self.scheduler.add_request(req)
            ids.append(child_id)
        self.children[request_id] = ids
        self.prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        ids = self.children.pop(request_id, [])
        aborted = self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        if aborted:
            self.num_aborted += 1
        for req in aborted:
            self._done_drafting(req)
        self._forget(ids)

    def _forget(self, child_ids: list[str]) -> None:
        for cid in child_ids:
            seq = self.sequences.pop(cid, None)
            if seq is not None:
                siblings = self.children.get(seq.parent_id)
                if siblings is not None and all(s not in self.sequences for s in siblings):
                    del self.children[seq.parent_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        begun = time.perf_counter()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        started = time.perf_counter()
        result = self.runner.execute(sched_out)
        drafted = {s.request.request_id: len(s.draft_token_ids) for s in sched_out.scheduled if s.draft_token_ids}
        # a decode step (drafts or not, no prompt chunk): a point of the draft policy's cost line
        decoding = all(s.num_tokens - len(s.draft_token_ids) == 1 for s in sched_out.scheduled)
        if self.policy is not None and decoding:
            self.policy.observe_step(sched_out.total_tokens, time.perf_counter() - started)
        kind = "prefill" if not decoding else "verify" if drafted else "decode"
        try:
            return self._emit(sched_out, result, drafted)
        finally:
            self.steps[kind] += 1
            self.step_seconds[kind] += time.perf_counter() - begun

    def _emit(self, sched_out: SchedulerOutput, result: RunnerOutput, drafted: dict[str, int]) -> list[RequestOutput]:
        """The step's tokens applied to its requests: outputs, stop strings, finished sequences, next drafts."""
        for s in sched_out.scheduled:
            if got := result.prompt_logprobs.get(s.request.request_id):
                s.request.prompt_logprobs.extend(got)
        updated = self.scheduler.update(sched_out, result.sampled)
        if self.policy is not None:
            self.policy.begin_step(self.scheduler.num_running)
        outputs = []
        finished_ids = []
        for req, kept in updated:
            rid = req.request_id
            seq = self.sequences[rid]
            if rid in drafted:
                accepted = len(result.sampled[rid]) - 1
                self.spec_stats.record(drafted[rid], accepted)
                if self.policy is not None:
                    self.policy.record(rid, drafted[rid], accepted)
            tokens = req.output_token_ids[len(req.output_token_ids) - kept :]
            first = len(req.output_token_ids) == kept  # the sequence's first output (kept across preemption)
            finished = req.is_finished
            text = ""
            emitted = 0
            offsets: list[int] = []
            for i, token in enumerate(tokens):
                emitted += 1
                if seq.detokenizer is not None:
                    offsets.append(len(seq.detokenizer.text))
                last = i == len(tokens) - 1
                stopped_at_eos = last and req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None
                if seq.detokenizer is not None and stopped_at_eos and token in self.eos_token_ids:
                    text += seq.detokenizer.flush()  # the end-of-sequence token itself is not output text
                elif seq.detokenizer is not None:
                    delta = seq.detokenizer.step(token, finished and last)
                    text += delta.text
                    if delta.stop_string is not None:
                        if not finished:
                            self.scheduler.finish_requests([rid], RequestStatus.FINISHED_STOPPED)
                            finished = True
                        req.status = RequestStatus.FINISHED_STOPPED
                        req.stop_reason = delta.stop_string
                        if not last:  # the tokens after the stop string are not output
                            cut = len(tokens) - emitted
                            del req.output_token_ids[-cut:]
                            del req.all_token_ids[-cut:]
                        break
            tokens = tokens[:emitted]
            self.generation_tokens += emitted
            lps = result.logprobs.get(rid, [])[:emitted]
            prompt_lps = (
                list(req.prompt_logprobs) if first and req.sampling_params.prompt_logprobs is not None else None
            )
            outputs.append(
                RequestOutput(
                    request_id=seq.parent_id,
                    index=seq.index,
                    token_ids=tokens,
                    text=text,
                    logprobs=lps,
                    finished=finished,
                    text_offsets=offsets,
                    finish_reason=req.status.value if finished else None,
                    stop_reason=req.stop_reason if finished else None,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_output_tokens=req.num_output_tokens,
                    num_cached_tokens=req.num_cached_tokens,
                    prompt_logprobs=prompt_lps,
                )
            )
            if finished:
                finished_ids.append(rid)
                self._done_drafting(req)
            elif self.proposer is not None:
                req.spec_token_ids = self._drafts(req)
        self._forget(finished_ids)
        return outputs

    def _drafts(self, req: Request) -> list[int]:
        """Guesses of the next tokens of a sequence that is about to decode (none if it cannot use any)."""
        room = req.budget - 1  # the due token comes first; drafts past max_tokens or the context are waste
        if room <= 0 or req.num_tokens - req.num_computed_tokens != 1:
            return []
        assert self.proposer is not None and self.policy is not None
        if req.grammar is not None and req.grammar.forced:
            return list(req.grammar.forced[: min(room, self.max_draft_tokens)])  # the grammar knows these tokens
        if not self.policy.wants(req.request_id):
            return []
        drafts = self.proposer.propose(req.request_id, req.all_token_ids, room, req.cache_salt)
        return drafts[: self.policy.keep(req.request_id, len(drafts))] if drafts else drafts

    def _done_drafting(self, req: Request) -> None:
        if self.proposer is not None and self.policy is not None:
            self.proposer.finish(req.request_id, req.all_token_ids, req.num_prompt_tokens, req.cache_salt)
            self.policy.forget(req.request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            num_aborted=self.num_aborted,
            spec=self.spec_stats.copy() if self.proposer is not None else None,
            steps=dict(self.steps),
            step_seconds=dict(self.step_seconds),
        )


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationResult:
    """Everything a finished request produced (the offline API's result)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs] | None = None  # with params.prompt_logprobs: prompt tokens 1..

    def absorb(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        c = self.outputs[out.index]
        c.text += out.text
        c.token_ids.extend(out.token_ids)
        c.logprobs.extend(out.logprobs)
        if out.finished:
            c.finish_reason = out.finish_reason
            c.stop_reason = out.stop_reason
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
