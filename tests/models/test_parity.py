"""Greedy tokens equal Hugging Face transformers' on the same weights (fp32).

Every engine run submits all prompts at once (continuous batching), with prompts
that share prefixes (prefix-cache hits), a small token budget (chunked prefill),
and once more with a KV cache too small for all of them (preemption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
from collections.abc import Iterator

import pytest
import torch

from agora import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.models import gguf_py

NEW_TOKENS = 64


def hf_greedy(model, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )  # fmt: skip
        out.append(gen[0, len(p) :].tolist())
    return out


def engine_greedy(llm: LLM, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


def shared_prefix_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(37)]
    lengths = [5, 23, 61, 97, 140]
    prompts = []
    for i, n in enumerate(lengths):
        tail = [rng.randrange(3, vocab) for _ in range(n)]
        prompts.append(system + tail if i % 2 else tail)  # every other prompt shares the prefix
    prompts.append(system + prompts[1][len(system) :][:10])  # and one shares a longer prefix
    return prompts


# name -> (HF model_type, config overrides): one per family and per switch that matters.
TINY_VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", {
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }),
    "llama-mha-linear-rope": ("llama", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 24, "head_dim": 16}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
    "qwen3-qk-norm": ("qwen3", {"head_dim": 32}),
    "phi3-fused-sliding-window": ("phi3", {"sliding_window": 28, "rope_theta": 50000.0}),
    "gemma3-local-global": ("gemma3_text", {
        "head_dim": 32, "sliding_window": 24, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "num_hidden_layers": 3, "query_pre_attn_scalar": 24, "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    }),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model_type, overrides = TINY_VARIANTS[request.param]
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), 320, model_type, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = shared_prefix_prompts(320)
    return path, prompts, hf_greedy(hf, prompts)


def test_tiny_llama_matches_transformers_batched_with_prefix_caching(tiny):
    path, prompts, expected = tiny
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=48)
    assert engine_greedy(llm, prompts) == expected
    # Again, now that the prompts are in the prefix cache.
    assert engine_greedy(llm, prompts) == expected
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > 0
    assert stats.kv_cache_usage == 0.0


def test_prompt_logprobs_match_transformers(tiny):
    # each prompt token's logprob under the model, and the top 3 there: in chunks (48 tokens a step), batched,
    # and again once the prompts are in the prefix cache (a prompt that wants its logprobs computes them anyway)
    path, prompts, _ = tiny
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=48)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    for _ in range(2):
        for prompt, result in zip(prompts, llm.generate(prompts, params), strict=True):
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
            got = result.prompt_logprobs
            assert [x.token_id for x in got] == prompt[1:]
            want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert torch.allclose(torch.tensor([x.logprob for x in got]), want, atol=2e-4)
            top = ref[:-1].topk(3, dim=-1)
            for i, x in enumerate(got):
                assert [t for t, _ in x.top] == top.indices[i].tolist()
                assert torch.allclose(torch.tensor([v for _, v in x.top]), top.values[i], atol=2e-4)
                assert x.rank == 1 + int((ref[i] > ref[i, prompt[i + 1]]).sum())
    assert llm.engine.stats().prefix_cache_hits == 0  # shared prefixes, cached prompts: none was taken
    assert llm.engine.kv.usage() == 0.0
    # preempted mid-prompt and computed again: each prompt token's logprob given once, the same
    calm = [[x.logprob for x in r.prompt_logprobs] for r in llm.generate(prompts, params)]
    small = LLM(str(path), dtype="float32", block_size=4, num_blocks=60, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24, prompt_logprobs=0)
    crowded = [[x.logprob for x in r.prompt_logprobs] for r in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert [len(c) for c in crowded] == [len(c) for c in calm]
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=2e-4) for a, b in zip(crowded, calm, strict=True))


def test_tiny_llama_matches_transformers_under_preemption(tiny):
    path, prompts, expected = tiny
    # 6 sequences of up to 204 tokens need ~250 blocks of 4; give them 60.
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=60, max_num_batched_tokens=64)
    assert engine_greedy(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.usage() == 0.0


def test_tiny_llama_without_prefix_caching(tiny):
    path, prompts, expected = tiny
    llm = LLM(str(path), dtype="float32", block_size=16, num_blocks=128, enable_prefix_caching=False)
    assert engine_greedy(llm, prompts) == expected
    assert llm.engine.stats().prefix_cache_hits == 0


# -- the real default model ---------------------------------------------------------

SMOL_SYSTEM = (
    "You are a meticulous assistant for a logistics company. Answer with short, precise sentences, "
    "cite the relevant policy number when you can, and never invent shipment data."
)
SMOL_CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": "Where is parcel 42?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": SMOL_SYSTEM},
     {"role": "user", "content": "Summarize policy 7 on damaged goods and explain who pays for returns, "
                                 "what evidence a customer must provide, and how long a refund takes."}],
    [{"role": "user", "content": "List three prime numbers and explain why each is prime. " * 3}],
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_gguf) -> list[list[int]]:
    from agora.engine.tokenizer import Tokenizer
    from agora.models.loader import inspect_model

    tok = Tokenizer(inspect_model(smollm2_gguf).tokenizer_dir)
    prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in SMOL_CHATS]
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


@dataclasses.dataclass(frozen=True)
class Departure:
    """Where an output leaves transformers' greedy path: its ``position``, our token there, transformers' token, and
    by how much transformers prefers its own (its logit margin: 0 at an exact tie)."""

    prompt: int
    position: int
    ours: int
    theirs: int
    margin: float


class GreedyReference:
    """transformers' own GGUF loader and forward: an independent reading of the same file, as the reference.

    An output is transformers' greedy continuation of its prompt when, at every position, transformers' forward over
    the prompt and the output before that position scores the output's token highest (end-of-sequence barred, as
    ``min_new_tokens`` bars it from ``generate()``). That is one forward per output, where ``generate()`` takes one
    per token (for Gemma 3, 64 reads of a 671 MB fp32 output matrix, 100 ms each on two cores): the same check a
    speculative decoder makes of a draft. Outputs already checked are not checked again. Each file is loaded once
    per module and dropped with it."""

    def __init__(self) -> None:
        self.models: dict[str, torch.nn.Module] = {}
        self.checked: dict[tuple, list[Departure]] = {}

    def model(self, path) -> torch.nn.Module:  # the transformers model itself
        from transformers import AutoModelForCausalLM

        if str(path) not in self.models:
            with _gguf_parsed_once():
                hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            self.models[str(path)] = hf.eval()
        return self.models[str(path)]

    def departures(self, path, prompts: list[list[int]], outputs: list[list[int]]) -> list[Departure]:
        """Each output's first departure from transformers' greedy path, if it has one."""
        out = []
        for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            key = (str(path), tuple(prompt), tuple(output))
            if key not in self.checked:
                self.checked[key] = self._departures(self.model(path), i, prompt, output)
            out += [dataclasses.replace(d, prompt=i) for d in self.checked[key]]
        return out

    def check(self, path, prompts: list[list[int]], outputs: list[list[int]], new_tokens: int = NEW_TOKENS) -> None:
        """Every output is ``new_tokens`` long and transformers' greedy continuation of its prompt."""
        assert [len(o) for o in outputs] == [new_tokens] * len(prompts)
        assert self.departures(path, prompts, outputs) == []

    @staticmethod
    def _departures(model, index: int, prompt: list[int], output: list[int]) -> list[Departure]:
        ids = torch.tensor([prompt + output[:-1]])
        with torch.no_grad():
            logits = model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=len(output)).logits[0].float()
        eos = model.generation_config.eos_token_id
        logits[:, [eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")
        best = logits.argmax(dim=-1).tolist()
        n = next((j for j, (a, b) in enumerate(zip(output, best, strict=True)) if a != b), None)
        if n is None:
            return []
        return [Departure(index, n, output[n], best[n], float(logits[n, best[n]] - logits[n, output[n]]))]


@pytest.fixture(scope="module")
def gguf_reference() -> Iterator[GreedyReference]:
    reference = GreedyReference()
    yield reference
    reference.models.clear()


@contextlib.contextmanager
def _gguf_parsed_once():
    """While transformers loads a GGUF file, its header is parsed once, not once for the config and again
    for the weights, and from the file's bytes in memory (``tests.models.gguf_py``): Gemma's 262k-token
    vocabulary took 25 s a parse over a memmap, 8.5 s in memory. The tensor-name map is built once, not once per
    submodule. All are read only, so what gets loaded is unchanged."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict[str, gguf.GGUFReader] = {}

    def parse_once(file, *args, **kwargs):
        if args or kwargs:
            return reader(file, *args, **kwargs)
        if str(file) not in parsed:
            parsed[str(file)] = gguf_py.reader(file)
        return parsed[str(file)]

    gguf.GGUFReader, gguf.get_tensor_name_map = parse_once, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf, smollm2_prompts, gguf_reference):
    prompts = smollm2_prompts
    for spec in (None, "auto"):  # speculation off (plain decode steps), and the default (suffix on a CPU)
        llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=256, max_num_batched_tokens=96,
                  speculative_config=spec)  # fmt: skip
        gguf_reference.check(smollm2_gguf, prompts, engine_greedy(llm, prompts))
        assert llm.engine.stats().prefix_cache_hits > 0  # the shared system prompt
    # --gguf-weights blocks: no fp32 weights kept, the prompts' one 512-token step dequantizes them for its GEMMs
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=256, max_num_batched_tokens=512, gguf_weights="blocks")
    assert sum(len(p) for p in prompts) > llm.engine.runner.model.lm_head.kernel_rows
    gguf_reference.check(smollm2_gguf, prompts, engine_greedy(llm, prompts))


def test_the_reference_check_passes_generate_and_fails_a_changed_token(smollm2_gguf, smollm2_prompts, gguf_reference):
    """The check passes what generate() picks and fails anything else, naming where and by how much."""
    prompts, hf = smollm2_prompts[:2], gguf_reference.model(smollm2_gguf)
    generated = hf_greedy(hf, prompts, 16)
    gguf_reference.check(smollm2_gguf, prompts, generated, new_tokens=16)
    changed = [generated[0], generated[1][:9] + [(generated[1][9] + 1) % hf.config.vocab_size] + generated[1][10:]]
    (d,) = gguf_reference.departures(smollm2_gguf, prompts, changed)
    assert (d.prompt, d.position, d.ours, d.theirs) == (1, 9, changed[1][9], generated[1][9]) and d.margin > 0
    with pytest.raises(AssertionError):
        gguf_reference.check(smollm2_gguf, prompts, changed, new_tokens=16)


def test_smollm2_prompt_logprobs_match_transformers(smollm2_gguf, smollm2_prompts, gguf_reference):
    prompts = smollm2_prompts
    hf = gguf_reference.model(smollm2_gguf)
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=256, max_num_batched_tokens=96)
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = result.prompt_logprobs
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert torch.allclose(torch.tensor([x.logprob for x in got]), want, atol=1e-3)
        assert [x.top[0][0] for x in got] == ref[:-1].argmax(dim=-1).tolist()


@pytest.mark.slow
def test_smollm2_matches_transformers_under_preemption(smollm2_gguf, smollm2_prompts, gguf_reference):
    prompts = smollm2_prompts
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=24, block_size=16, max_num_batched_tokens=256)
    gguf_reference.check(smollm2_gguf, prompts, engine_greedy(llm, prompts))
    assert llm.engine.scheduler.num_preemptions > 0


GEMMA_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    # Longer than the 512-token sliding window of Gemma 3's local layers.
    "In the history of science, " + "measurement came before theory, and careful records made the difference. " * 52,
    "Photosynthesis converts light energy into chemical energy. Explain the two stages:",
    # One that invites copying, so speculative drafts get accepted.
    "Copy: alpha beta gamma delta epsilon zeta eta theta. Copy: alpha beta gamma",
]


@pytest.fixture(scope="module")
def gemma3_prompts(gemma3_gguf) -> list[list[int]]:
    from agora.engine.tokenizer import Tokenizer
    from agora.models.loader import inspect_model

    tok = Tokenizer(inspect_model(gemma3_gguf).tokenizer_dir)
    prompts = [tok.encode(t) for t in GEMMA_TEXTS]
    assert max(len(p) for p in prompts) > 600
    return prompts


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_gguf, gemma3_prompts, gguf_reference):
    llm = LLM(str(gemma3_gguf), dtype="float32", num_blocks=128, max_num_batched_tokens=256)
    gguf_reference.check(gemma3_gguf, gemma3_prompts, engine_greedy(llm, gemma3_prompts))


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_smollm2_with_a_two_byte_kv_cache_stays_close_to_transformers(
    smollm2_gguf, smollm2_prompts, gguf_reference, kv_dtype
):
    """fp16 or bf16 K/V rounding is not fp32 math, so exact parity is not promised: the greedy text may
    part from the reference, but only where the reference itself nearly tied. At each output's first
    departure from transformers' greedy path, transformers (fp32, fed the tokens before it) must score our
    token within ``near_tie`` logits of its best; a cache that computed wrong K/V parts where the reference is sure.
    (Where such a flip falls depends on the CPU's sums: bf16 parted from SmolLM2's references at 12 and
    27 of 64 tokens on an AVX2-only Zen 3, on reference margins of 0.03 and 0.008 logits.)"""
    near_tie = 0.5  # logits; the bf16 cache's largest logit error on a 139-token text is ~0.18 (cpu_decode.py)
    prompts = smollm2_prompts
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=256, max_num_batched_tokens=96, kv_cache_dtype=kv_dtype)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, kv_dtype)
    got = engine_greedy(llm, prompts)
    assert [len(g) for g in got] == [NEW_TOKENS] * len(prompts)
    parted = gguf_reference.departures(smollm2_gguf, prompts, got)
    print(f"{kv_dtype} KV: outputs that part from the reference:", parted)
    assert all(d.margin <= near_tie for d in parted), parted
    assert len(parted) <= len(prompts) // 2  # most outputs stay the reference's whole


# -- speculative decoding: the same greedy tokens, with drafts verified in the same forward -------------

SPEC_CONFIGS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 8},
}
# A conversation whose answer copies its context, so drafts are accepted (not just proposed and refused).
COPY_CHAT = [{"role": "user", "content": "Repeat this line exactly: the parcel left Lyon on Monday at 9:40 "
                                         "and reached Porto on Wednesday at 17:05."}]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_copy_prompts(smollm2_gguf, smollm2_prompts) -> list[list[int]]:
    from agora.engine.tokenizer import Tokenizer
    from agora.models.loader import inspect_model

    tok = Tokenizer(inspect_model(smollm2_gguf).tokenizer_dir)
    return [*smollm2_prompts, tok.encode(tok.apply_chat_template(COPY_CHAT), add_special_tokens=False)]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SPEC_CONFIGS))
def test_smollm2_with_speculation_matches_transformers(smollm2_gguf, smollm2_copy_prompts, gguf_reference, method):
    prompts = smollm2_copy_prompts
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=256, max_num_batched_tokens=96,
              speculative_config=SPEC_CONFIGS[method])  # fmt: skip
    gguf_reference.check(smollm2_gguf, prompts, engine_greedy(llm, prompts))
    assert llm.engine.stats().spec.num_accepted_tokens > 20


@pytest.mark.slow
def test_smollm2_with_speculation_matches_transformers_under_preemption(
    smollm2_gguf, smollm2_copy_prompts, gguf_reference
):
    prompts = smollm2_copy_prompts
    llm = LLM(str(smollm2_gguf), dtype="float32", num_blocks=24, block_size=16, max_num_batched_tokens=256,
              speculative_config=SPEC_CONFIGS["suffix"])  # fmt: skip
    gguf_reference.check(smollm2_gguf, prompts, engine_greedy(llm, prompts))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats().spec.num_accepted_tokens > 20


@pytest.mark.slow
def test_gemma3_270m_with_speculation_matches_transformers_under_preemption(
    gemma3_gguf, gemma3_prompts, gguf_reference
):
    prompts = gemma3_prompts
    # 46 blocks of 16 hold 736 tokens: the long prompt alone needs 44 by its end, the five others 5 each.
    llm = LLM(str(gemma3_gguf), dtype="float32", num_blocks=46, max_num_batched_tokens=256,
              speculative_config=SPEC_CONFIGS["suffix"])  # fmt: skip
    gguf_reference.check(gemma3_gguf, prompts, engine_greedy(llm, prompts))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats().spec.num_accepted_tokens > 20
