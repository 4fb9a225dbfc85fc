"""The shortest-ending planner against xgrammar itself: for every prefix of a valid output, the
ending it finds must be accepted by the compiled grammar and complete it, and no bounded search
of the grammar may find a shorter one."""

from __future__ import annotations

import json

import pytest

xgr = pytest.importorskip("xgrammar")

from agora.engine.structured.endings import (  # noqa: E402
    ChoiceEnding,
    FormatEnding,
    JsonSchemaEnding,
    _dumps,
    grammar_alphabet,
    search_ending,
)
from agora.openai.reasoning import MAY_OPEN, OPENED, think_format  # noqa: E402

ADDRESS = {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "minLength": 3}},
           "required": ["city", "zip"]}  # fmt: skip
PERSON = {"type": "object", "required": ["name", "age", "addr"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "addr": ADDRESS}}  # fmt: skip
SCHEMAS = [
    (PERSON, {"name": 'Bob "B" \u00e9', "age": -12, "tags": ["a", "b"], "addr": {"city": "X", "zip": "12345"}}),
    ({"type": "object", "required": ["a", "c", "d"], "properties": {
        "a": {"type": "number"}, "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "c": {"enum": ["red", "green", 3]}, "d": {"type": "boolean"}}},
     {"a": 1.5e3, "b": None, "c": "green", "d": False}),
    ({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer", "minimum": 5}, "y": {"type": "array", "items": {"type": "integer"}, "minItems": 2}}}},
     [{"x": 7, "y": [1, 2, 3]}, {"x": 10, "y": [0, 0]}]),
    ({"$defs": {"Node": {"type": "object", "required": ["n", "kids"], "properties": {
        "n": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
      "$ref": "#/$defs/Node"},
     {"n": "a", "kids": [{"n": "b", "kids": []}]}),
]  # fmt: skip


@pytest.fixture(scope="module")
def compiler(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok), max_threads=1, cache_enabled=False)


def completes(grammar, prefix: str, ending: str | None) -> bool:
    m = xgr.GrammarMatcher(grammar)
    assert m.accept_string(prefix) if prefix else True
    return ending is not None and (not ending or m.accept_string(ending)) and m.is_completed()


def check_every_prefix(grammar, ending_of, text: str, compare_every: int = 5) -> None:
    alphabet = grammar_alphabet(str(grammar.grammar))
    for k in range(len(text) + 1):
        prefix = text[:k]
        ending = ending_of(prefix)
        assert completes(grammar, prefix, ending), (prefix, ending)
        if k % compare_every == 0:
            m = xgr.GrammarMatcher(grammar)
            m.accept_string(prefix)
            searched = search_ending(m, alphabet, max_nodes=3000)
            assert searched is None or len(searched) >= len(ending), (prefix, ending, searched)


@pytest.mark.parametrize("schema,value", SCHEMAS, ids=["person", "scalars", "nested-arrays", "recursive"])
def test_json_schema_endings_complete_every_prefix(compiler, schema, value) -> None:
    grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    text = _dumps(value)
    assert xgr.GrammarMatcher(grammar).accept_string(text)
    check_every_prefix(grammar, JsonSchemaEnding(schema).ending, text)


def test_any_json_object(compiler) -> None:
    grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    text = _dumps({"k": [1, {"z": "w"}, -0.5e-3], "m": True, "n": None, "s": "t\\"})
    check_every_prefix(grammar, JsonSchemaEnding({"type": "object"}, strict=False).ending, text)


@pytest.mark.parametrize("prefix,ending", [
    ("", '{"name": "", "age": 0, "addr": {"city": "", "zip": "aaa"}}'),
    ('{"name": "Bo', '", "age": 0, "addr": {"city": "", "zip": "aaa"}}'),
    ('{"name": "Bo\\', 'n", "age": 0, "addr": {"city": "", "zip": "aaa"}}'),
    ('{"name": "Bob", "age": -', '1, "addr": {"city": "", "zip": "aaa"}}'),
    ('{"name": "Bob", "age": 3, "ta', 'gs": [], "addr": {"city": "", "zip": "aaa"}}'),
    ('{"name": "Bob", "age": 3, "addr": {"city": "X", "zip": "1', 'aa"}}'),
    ('{"name": "Bob", "age": 3, "addr": {"city": "X", "zip": "123"}', "}"),
])  # fmt: skip
def test_exact_endings(prefix, ending) -> None:
    assert JsonSchemaEnding(PERSON).ending(prefix) == ending


def test_number_bounds_and_unsatisfiable() -> None:
    from agora.engine.structured.endings import Unsatisfiable

    e = JsonSchemaEnding({"type": "object", "required": ["x"], "properties": {"x": {"type": "integer", "minimum": 5}}})
    assert e.ending('{"x": 1') == "0}"  # 1 alone is below the minimum: 10 is the shortest number above it
    assert e.ending("") == '{"x": 5}'
    no_way = JsonSchemaEnding({"type": "object", "required": ["a"], "properties": {}, "additionalProperties": False})
    with pytest.raises(Unsatisfiable):
        no_way.min_value(no_way.root)


def _call(name: str, schema: dict) -> dict:
    return {"type": "tag", "begin": f'<tool_call>\n{{"name": "{name}", "arguments": ',
            "content": {"type": "json_schema", "json_schema": schema}, "end": "}\n</tool_call>"}  # fmt: skip


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"]}  # fmt: skip
SEARCH = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>')  # fmt: skip
FORMATS = [
    ({"type": "tags_with_separator", "tags": [_call("get_weather", WEATHER), _call("search", SEARCH)],
      "separator": "\n", "at_least_one": True}, CALLS),
    ({"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [_call("get_weather", WEATHER),
      _call("search", SEARCH)]}, 'Let me look. <tool_call>\n{"name": "search", "arguments": {"q": "a b"}}\n</tool_call>ok'),
    ({"type": "or", "elements": [
        {"type": "tags_with_separator", "tags": [_call("search", SEARCH)], "separator": "\n", "at_least_one": True},
        {"type": "json_schema", "json_schema": {"type": "object", "properties": {"answer": {"type": "string"}},
                                                "required": ["answer"]}}]}, '{"answer": "forty two"}'),
]  # fmt: skip


ANSWER = {"type": "json_schema", "json_schema": {"type": "object", "properties": {"answer": {"type": "string"}},
                                                 "required": ["answer"]}}  # fmt: skip
FORMATS += [  # a reasoning model's: its thinking first (a "</thin" inside it is still thinking), then the format
    (think_format(ANSWER, OPENED), 'weigh </thin it\n</think>\n\n{"answer": "x"}'),
    (think_format(FORMATS[0][0], MAY_OPEN), "<think>hmm</think>" + CALLS),
    (think_format(ANSWER, MAY_OPEN), '{"answer": "at once"}'),
]


@pytest.mark.parametrize("fmt,text", FORMATS, ids=["required-calls", "auto-strict", "calls-or-json", "think-opened",
                                                   "think-then-calls", "think-skipped"])  # fmt: skip
def test_structural_tag_endings_complete_every_prefix(compiler, fmt, text) -> None:
    grammar = compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    assert xgr.GrammarMatcher(grammar).accept_string(text)
    check_every_prefix(grammar, FormatEnding(fmt).ending, text, compare_every=11)


def test_forced_call_starts_with_the_shortest_tool() -> None:
    fmt = FORMATS[0][0]
    # a structural tag's JSON may leave whitespace out, so its endings are compact
    assert FormatEnding(fmt).ending("") == '<tool_call>\n{"name": "search", "arguments": {"q":""}}\n</tool_call>'
    assert (
        FormatEnding(fmt).ending('<tool_call>\n{"name": "get_w') == 'eather", "arguments": {"city":""}}\n</tool_call>'
    )
    # search takes one property: after it, a comma starts nothing the grammar allows, so there is no ending
    assert FormatEnding(fmt).ending('<tool_call>\n{"name": "search", "arguments": {"q": "x",') is None


def test_choice_and_regex_search(compiler) -> None:
    e = ChoiceEnding(["yes", "no", "maybe so"])
    assert (e.ending(""), e.ending("m"), e.ending("maybe so"), e.ending("x")) == ("no", "aybe so", "", None)
    grammar = compiler.compile_regex(r"\d{3}-[a-z]+@(foo|barbaz)\.com")
    m = xgr.GrammarMatcher(grammar)
    m.accept_string("12")
    assert search_ending(m, grammar_alphabet(str(grammar.grammar))) == "0-a@foo.com"
