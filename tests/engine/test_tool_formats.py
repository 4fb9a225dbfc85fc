"""Every tool-call format as a grammar: xgrammar compiles it, the parser reads back what it allows
(its smallest output included), and the format's own rendering of past calls is one it accepts."""

from __future__ import annotations

import json

import jsonschema
import pytest

xgr = pytest.importorskip("xgrammar")

from agora.engine.structured.endings import FormatEnding  # noqa: E402
from agora.openai.tool_parsers import PARSERS, Tool  # noqa: E402

TOOLS = [
    Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                         "required": ["city"]}),
    Tool("search", {"type": "object", "properties": {"q": {"type": "string"}, "top": {"type": "integer"}},
                    "required": ["q"]}),
    Tool("ping", {"type": "object", "properties": {}}),
]  # fmt: skip


@pytest.fixture(scope="module")
def compiler(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok), max_threads=1, cache_enabled=False)


def read(parser_name: str, text: str) -> list[tuple[str, dict]]:
    parser = PARSERS[parser_name]()
    out = parser.feed(text).then(parser.finish())
    calls: dict[int, list] = {}
    for f in out.calls:
        calls.setdefault(f.index, [f.name, ""])[1] += f.arguments
    return [(n, json.loads(a)) for n, a in calls.values()]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_required_calls_grammar_parses_back(compiler, name) -> None:
    parser = PARSERS[name]
    fmt = parser.calls_format(TOOLS, at_least_one=True, parallel=True)
    grammar = compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    smallest = FormatEnding(fmt).ending("")
    m = xgr.GrammarMatcher(grammar)
    assert m.accept_string(smallest) and m.is_completed(), smallest
    calls = read(name, smallest)
    assert len(calls) == 1 and calls[0][0] in {t.name for t in TOOLS}
    by_name = {t.name: t for t in TOOLS}
    jsonschema.validate(calls[0][1], by_name[calls[0][0]].schema)
    written = [("get_weather", '{"city": "Oslo", "unit": "c"}'), ("search", '{"q": "fjords", "top": 3}')]
    text = parser.render_calls(written)
    m = xgr.GrammarMatcher(grammar)
    assert m.accept_string(text) and m.is_completed(), text
    assert read(name, text) == [(n, json.loads(a)) for n, a in written]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_one_call_when_not_parallel(compiler, name) -> None:
    fmt = PARSERS[name].calls_format(TOOLS[:1], at_least_one=True, parallel=False)
    grammar = compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    two = PARSERS[name].render_calls([("get_weather", '{"city": "A"}'), ("get_weather", '{"city": "B"}')])
    m = xgr.GrammarMatcher(grammar)
    assert not m.accept_string(two)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_auto_with_strict_tools_allows_text_and_constrains_calls(compiler, name) -> None:
    parser = PARSERS[name]
    fmt = parser.triggered_format(TOOLS, parallel=True)
    grammar = compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    m = xgr.GrammarMatcher(grammar)
    assert m.accept_string("Hello, no tools needed") and m.is_completed()
    bad = parser.render_calls([("get_weather", '{"town": "A"}')])  # a property the schema does not have
    assert not xgr.GrammarMatcher(grammar).accept_string(bad)
