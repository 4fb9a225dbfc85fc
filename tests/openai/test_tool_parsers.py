"""Tool-call parsers, table-driven: every format, fed whole and in pieces of every size, gives the
same content and calls; markup never reaches content; a call's first fragment has its id and name."""

from __future__ import annotations

import json

import pytest

from agora.openai.tool_parsers import PARSERS, choose_parser, template_knows_tools
from agora.openai.tool_parsers.base import json_end
from agora.openai.tool_parsers.pythonic import parse_calls

W = '{"city": "Paris", "unit": "c"}'
CASES = [
    # parser, model text, expected content, expected calls [(name, arguments as JSON)]
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>', "", [("get_weather", W)]),
    ("hermes", f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>\n',
     "Let me check.", [("get_weather", W), ("search", '{"q": "x"}')]),
    ("hermes", '<tool_call>{"arguments": {"q": "a<b"}, "name": "search"}</tool_call> done', "done",
     [("search", '{"q": "a<b"}')]),  # arguments before the name: held until the name is known
    ("hermes", '<tool_call>{"name": "noargs"}</tool_call>', "", [("noargs", "{}")]),
    ("hermes", "A plain answer with a < sign and <tool_ in it.", "A plain answer with a < sign and <tool_ in it.", []),
    ("hermes", "<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {W}}}', "", [("get_weather", W)]),
    ("llama3_json", f'<|python_tag|>{{"name": "get_weather", "parameters": {W}}}; {{"name": "search", '
                    '"parameters": {"q": "x"}}', "", [("get_weather", W), ("search", '{"q": "x"}')]),
    ("llama3_json", "Paris is sunny today.", "Paris is sunny today.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON that is not a call
    ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {W}}}, {{"name": "search", "arguments": '
                '{"q": "x"}}]', "", [("get_weather", W), ("search", '{"q": "x"}')]),
    ("mistral", f"Sure. [TOOL_CALLS]get_weather[ARGS]{W}", "Sure. ", [("get_weather", W)]),
    ("mistral", "No tools needed.", "No tools needed.", []),
    ("pythonic", '[get_weather(city="Paris", unit="c"), search(q="x")]', "",
     [("get_weather", W), ("search", '{"q": "x"}')]),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("pythonic", "Hello there", "Hello there", []),
]  # fmt: skip


def run(parser_name: str, text: str, step: int) -> tuple[str, list[tuple[str, str]], list]:
    parser = PARSERS[parser_name]()
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    content, fragments = "", []
    for piece in pieces:
        out = parser.feed(piece)
        content += out.content
        fragments += out.calls
    out = parser.finish()
    content += out.content
    fragments += out.calls
    calls: dict[int, dict] = {}
    for f in fragments:
        if f.index not in calls:
            assert f.id and f.name, f"the first fragment of call {f.index} names it: {f}"
            calls[f.index] = {"name": f.name, "arguments": ""}
        else:
            assert f.id is None and f.name is None
        calls[f.index]["arguments"] += f.arguments
    assert parser.has_calls == bool(calls)
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], fragments


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_whole_and_streamed_agree(parser, text, content, calls) -> None:
    for step in (len(text) or 1, 1, 2, 3, 5, 8, 13):
        got_content, got_calls, _ = run(parser, text, step)
        assert got_content == content, (step, got_content)
        assert [n for n, _ in got_calls] == [n for n, _ in calls], step
        assert [json.loads(a) for _, a in got_calls] == [json.loads(a) for _, a in calls], step


def test_arguments_stream_in_fragments() -> None:
    text = '<tool_call>\n{"name": "search", "arguments": {"q": "a long query"}}\n</tool_call>'
    _, calls, fragments = run("hermes", text, 4)
    assert len([f for f in fragments if f.arguments]) > 3  # many pieces, not one at the end
    assert calls == [("search", '{"q": "a long query"}')]  # exactly the model's text


def test_mistral_ids_are_nine_characters() -> None:
    _, _, fragments = run("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}]', 3)
    assert len(fragments[0].id) == 9 and fragments[0].id.isalnum()


def test_choose_parser_from_the_template() -> None:
    assert not template_knows_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert choose_parser("{{ messages }}").name == "hermes"  # knows no tools: agora's default prompt
    assert choose_parser("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert choose_parser("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert choose_parser("{% if tools %}<|python_tag|>{% endif %}").name == "llama3_json"
    assert choose_parser("{% if tools %}[func_name1(params_name1=params_value1)]{% endif %}").name == "pythonic"
    assert choose_parser("{{ messages }}", "mistral").name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        choose_parser(None, "nope")


def test_json_end_and_pythonic_literals() -> None:
    assert json_end('{"a": "}"} tail', 0) == 10
    assert json_end("  [1, [2, 3]]", 0) == 13
    assert json_end('{"a": 1', 0) is None
    with pytest.raises(ValueError):
        json_end("{'a': 1}", 0)
    assert parse_calls('[f(a=true, b=None, c=[1, {"k": null}]), m.g()]') == [
        ("f", {"a": True, "b": None, "c": [1, {"k": None}]}), ("m.g", {})]  # fmt: skip
    assert parse_calls("[f(1)]") is None and parse_calls("f()") is None
