"""Structured outputs in the engine, on a tiny random model (the grammar guarantees validity
whatever the weights): always-valid endings under any budget, n > 1, preemption, chunked prefill,
prefix-cache hits, the compile cache."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")

from agora import LLM, SamplingParams  # noqa: E402
from agora.engine.sampling import ParamError, StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "required": ["name", "age"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
JSON = StructuredOutputsParams(json=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_blocks=96, max_num_batched_tokens=64)


def smallest_output_tokens(llm: LLM) -> int:
    return len(llm.engine.tokenizer.encode('{"name": "", "age": 0}', add_special_tokens=False))


def test_every_budget_ends_valid_or_cannot(llm) -> None:
    """From the smallest output's length up, every max_tokens gives valid JSON that says stop; below it
    nothing fits and the output is cut (length)."""
    least = smallest_output_tokens(llm)
    for max_tokens in range(least - 2, least + 40, 3):
        for temperature in (0.0, 1.0):
            p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=max_tokens, structured_outputs=JSON)
            out = llm.generate(["Hello world"], p)[0].outputs[0]
            assert len(out.token_ids) <= max_tokens
            if max_tokens < least:
                assert out.finish_reason == "length"
                continue
            value = json.loads(out.text)
            assert out.finish_reason == "stop", (max_tokens, out.text)
            assert set(value) <= {"name", "age", "tags"} and isinstance(value["age"], int)


def test_regex_choice_and_grammar(llm) -> None:
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        (StructuredOutputsParams(choice=("yes", "no", "maybe so")), lambda t: t in ("yes", "no", "maybe so")),
        (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ")"'), lambda t: re.fullmatch(r"\([0-9]+\)", t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, ok in cases:
        for seed in range(3):
            p = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, structured_outputs=spec)
            out = llm.generate(["Once upon a time"], p)[0].outputs[0]
            assert ok(out.text), (spec, out.text, out.finish_reason)


def test_n_gives_each_sequence_its_own_matcher(llm) -> None:
    p = SamplingParams(n=4, max_tokens=60, temperature=1.0, seed=5, structured_outputs=JSON)
    outs = llm.generate(["Hi"], p)[0].outputs
    texts = [o.text for o in outs]
    assert all(isinstance(json.loads(t), dict) for t in texts)
    assert len(set(texts)) > 1


def test_state_survives_preemption_chunked_prefill_and_prefix_hits(tiny_model_dir) -> None:
    """Greedy constrained outputs are the same alone, batched under a KV budget that forces preemption,
    with a long prompt prefilled in chunks, and again from the prefix cache."""
    prompts = [f"The quick brown fox {i} " * 12 for i in range(6)]
    p = SamplingParams(max_tokens=80, temperature=0, structured_outputs=JSON)
    roomy = LLM(str(tiny_model_dir), num_blocks=256, max_num_batched_tokens=512)
    alone = [roomy.generate([q], p)[0].outputs[0].text for q in prompts]
    tight = LLM(str(tiny_model_dir), num_blocks=40, max_num_batched_tokens=32)
    batched = [r.outputs[0].text for r in tight.generate(prompts, p)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert batched == alone
    again = [r.outputs[0].text for r in tight.generate(prompts, p)]
    assert again == alone and tight.engine.stats().prefix_cache_hits > 0
    assert all(isinstance(json.loads(t), dict) for t in alone)


def test_unconstrained_greedy_is_unchanged_beside_constrained_requests(llm) -> None:
    free = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = llm.generate(["Hello world"], free)[0].outputs[0].token_ids
    mixed = llm.generate(["Hello world", "Hello world"], [free, SamplingParams(max_tokens=20, temperature=0,
                                                                               structured_outputs=JSON)])  # fmt: skip
    assert mixed[0].outputs[0].token_ids == alone


def test_compile_cache_and_errors(llm) -> None:
    grammars = llm.engine.grammars
    spec = StructuredOutputsParams(json=json.dumps({"type": "object", "properties": {"zz": {"type": "boolean"}}}))
    hits, misses = grammars.hits, grammars.misses
    first = grammars.compile(spec).result()
    assert grammars.compile(spec).result() is first
    assert (grammars.hits, grammars.misses) == (hits + 1, misses + 1)
    with pytest.raises(ParamError, match="Regex parsing error"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")))
    with pytest.raises(ParamError, match="exactly one"):
        StructuredOutputsParams(regex="a", grammar='root ::= "a"')


def test_each_matcher_accepted_exactly_its_sequence(tiny_model_dir) -> None:
    """Under preemption and chunked prefill, every sequence's matcher took exactly the tokens it output."""
    llm = LLM(str(tiny_model_dir), num_blocks=40, max_num_batched_tokens=32)
    engine = llm.engine
    p = SamplingParams(n=2, max_tokens=80, temperature=1.0, seed=3, structured_outputs=JSON)
    for i in range(4):
        engine.add_request(f"r{i}", engine.tokenizer.encode(f"The quick brown fox {i} " * 12), p)
    requests = list(engine.scheduler.requests.values())
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    for req in requests:
        g = req.grammar
        assert g.num_accepted == len(req.output_token_ids)
        # xgrammar's JSON strings take any UTF-8-shaped bytes, encoded surrogates too (which Python refuses).
        assert bytes(g.text) == b"".join(
            g.vocab.token_bytes[t] for t in req.output_token_ids if t not in engine.eos_token_ids
        )
        assert json.loads(bytes(g.text).decode("utf-8", "surrogatepass")) is not None


def test_end_of_sequence_only_where_the_grammar_may_end(llm) -> None:
    eos = sorted(llm.engine.eos_token_ids)[0]
    flag = StructuredOutputsParams(json=json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                    "required": ["ok"]}))  # fmt: skip
    p = SamplingParams(max_tokens=80, temperature=0, logit_bias={eos: 100.0}, structured_outputs=flag)
    out = llm.generate(["Hi"], p)[0].outputs[0]
    # masked inside the object however strongly the model wants it, taken the moment the object is whole
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and out.token_ids.count(eos) == 1
    assert json.loads(out.text) in ({"ok": True}, {"ok": False}) and len(out.token_ids) < 20
