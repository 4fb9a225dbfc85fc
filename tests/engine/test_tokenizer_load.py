"""A converted GGUF tokenizer loads as transformers' generic class without AutoTokenizer, and is the same tokenizer."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from agora.engine.tokenizer import Tokenizer, _generic_class
from agora.models.loader import inspect_model

TEXTS = ["Hello world", "  spaces,\ttabs\n\nand newlines", "<|im_start|>user\nhi<|im_end|>", "émoji 🤖 中文 العربية",
         "def f(x):\n    return x**2  # code", "", "<|endoftext|>", "a" * 300]  # fmt: skip


def test_the_default_models_tokenizer_is_what_auto_tokenizer_gives(smollm2_gguf) -> None:
    folder = inspect_model(smollm2_gguf).tokenizer_dir
    assert _generic_class(folder)
    ours, auto = Tokenizer(folder).hf, AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(auto)
    for text in TEXTS:
        for special in (True, False):
            ids = auto.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids
            assert ours.decode(ids) == auto.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert ours.special_tokens_map == auto.special_tokens_map and ours.all_special_ids == auto.all_special_ids
    assert ours.get_vocab() == auto.get_vocab() and len(ours) == len(auto)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kw in ({}, {"tools": tools}):
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw) == \
            auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)  # fmt: skip


def test_folders_auto_tokenizer_might_resolve_otherwise_still_go_through_it(tiny_model_dir, tmp_path) -> None:
    assert not _generic_class(tiny_model_dir)  # a model folder: its config.json's model type can pick the class
    for name, config in {
        "named": {"tokenizer_class": "GemmaTokenizer"},
        "remote": {"tokenizer_class": "TokenizersBackend", "auto_map": {"AutoTokenizer": ["x.Y", None]}},
        "broken": None,
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text("{not json" if config is None else json.dumps(config))
        assert not _generic_class(folder), name
