"""The shortest valid ending of a constrained output, from the text generated so far.

When ``max_tokens`` is about to run out inside a structure, the decoder forces the
ending this module finds, so the client never receives unterminated JSON. An
``Ending`` is built once per constraint (off the step loop) from the same description
the grammar was compiled from, then asked ``ending(text)`` as the output grows::

    format tree (JSON schema, or the structural tag of a tool call)
        text so far ─▶ parse it against the tree, every way it can be read
                       └▶ where the text ends inside a node: that node's shortest
                          completion + the shortest rest of every enclosing node
        ─▶ the shortest of those suffixes

JSON values complete minimally: an open string is closed, a partial number or
literal finished, missing required properties are added in the schema's order with
their smallest values, arrays padded to ``minItems``, then every open array and
object closed. Strings with a ``pattern`` or ``format`` are leaves whose completions
are searched on their own small grammar (compiled with the constraint). What this
module cannot model returns None; the caller then searches the whole grammar
(:func:`search_ending`) and always verifies an ending on the grammar matcher before
forcing it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ITEM_SEP, KEY_SEP = ", ", ": "  # xgrammar's JSON layout without free whitespace
_MAX_DEPTH = 32  # $ref recursion while building smallest values
MAX_ENDING_CHARS = 16 << 10  # longer endings are not modelled (a schema can ask for millions of items)
_WS = " \t\n\r"


class Unsupported(Exception):
    """A schema feature this module does not model."""


class TooLong(Unsupported):
    """The ending would pass ``MAX_ENDING_CHARS``."""


class Unsatisfiable(Unsupported):
    """No value can satisfy the schema (a ``false`` schema, a required property that may not appear...)."""


@dataclass(frozen=True, slots=True)
class Tail:
    """The text ended inside a node; ``suffix`` completes it and everything around it."""

    suffix: str


Outcome = int | Tail  # a full parse ending at this index, or the text ended inside
LeafSolver = Callable[[dict[str, Any], str], str | None]  # (leaf schema, partial JSON text) -> completion


def _dumps(value: Any, compact: bool = False) -> str:
    seps = (",", ":") if compact else (ITEM_SEP, KEY_SEP)
    return json.dumps(value, separators=seps, ensure_ascii=False)


class JsonSchemaEnding:
    """Shortest completions of partial JSON text under a JSON schema (xgrammar's reading of it).

    ``compact``: the grammar lets whitespace between tokens be left out (xgrammar's structural
    tags), so endings use bare ``,`` and ``:``; otherwise the layout is xgrammar's fixed
    ``", "`` and ``": "``, where a text that ends right after ``,`` still owes the space.
    """

    def __init__(self, schema: dict[str, Any] | bool, strict: bool = True, leaf: LeafSolver | None = None,
                 compact: bool = False) -> None:  # fmt: skip
        self.root = schema
        self.strict = strict  # unlisted properties are refused unless additionalProperties allows them
        self.leaf = leaf
        self.compact = compact
        self.item_sep, self.key_sep = (",", ":") if compact else (ITEM_SEP, KEY_SEP)
        self.pad = "" if compact else " "  # what a bare "," or ":" is still owed
        self._smallest: dict[int, tuple[Any, str]] = {}  # id(schema) -> (schema, its smallest value)

    # -- schema helpers ------------------------------------------------------------------

    def resolve(self, schema: Any, depth: int = 0) -> Any:
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            if depth > _MAX_DEPTH or not isinstance(ref, str) or not ref.startswith("#"):
                raise Unsupported(f"$ref {ref!r}")
            node: Any = self.root
            for part in ref[1:].split("/")[1:] if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(node, dict) or part not in node:
                    raise Unsupported(f"$ref {ref!r}")
                node = node[part]
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**node, **extra} if extra and isinstance(node, dict) else node
            depth += 1
        if isinstance(schema, dict) and "allOf" in schema:
            parts = schema["allOf"]
            if len(parts) != 1:
                raise Unsupported("allOf")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            inner = self.resolve(parts[0], depth + 1)
            schema = {**inner, **rest} if isinstance(inner, dict) else inner
        return schema

    def branches(self, schema: Any) -> list[Any]:
        """The alternatives a value may take (anyOf / oneOf / a list of types), each resolved."""
        schema = self.resolve(schema)
        if schema is True or schema == {}:
            return [True]
        if schema is False:
            return []
        if not isinstance(schema, dict):
            raise Unsupported("schema")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k != key}
                out = []
                for b in schema[key]:
                    b = self.resolve(b)
                    out.extend(self.branches({**rest, **b} if isinstance(b, dict) and rest else b))
                return out
        types = schema.get("type")
        if isinstance(types, list):
            return [{**schema, "type": t} for t in types]
        return [schema]

    @staticmethod
    def kind(schema: Any) -> str:
        """object, array, string, integer, number, boolean, null, enum, or any."""
        if schema is True:
            return "any"
        if "enum" in schema or "const" in schema:
            return "enum"
        t = schema.get("type")
        if t is None:
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                return "object"
            if "items" in schema or "prefixItems" in schema:
                return "array"
            if "pattern" in schema or "format" in schema or "minLength" in schema:
                return "string"
            return "any"
        if t not in ("object", "array", "string", "integer", "number", "boolean", "null"):
            raise Unsupported(f"type {t!r}")
        return t

    def _props(self, schema: dict[str, Any]) -> tuple[list[str], set[str], Any]:
        props = list((schema.get("properties") or {}).keys())
        required = set(schema.get("required") or [])
        extra = schema.get("additionalProperties", not self.strict)
        if not props and "additionalProperties" not in schema and "properties" not in schema:
            extra = True  # an object with nothing declared takes any property
        return props, required, extra

    def _prop_schema(self, schema: dict[str, Any], key: str) -> Any:
        props = schema.get("properties") or {}
        if key in props:
            return props[key]
        extra = schema.get("additionalProperties", True)
        return True if extra is True or extra is None else extra

    # -- smallest values ---------------------------------------------------------------------

    def min_value(self, schema: Any, depth: int = 0) -> str:
        known = self._smallest.get(id(schema))
        if known is not None and known[0] is schema:  # the schema is kept with its value: the id stays its own
            return known[1]
        if depth > _MAX_DEPTH:
            raise Unsupported("recursion")
        best: str | None = None
        for b in self.branches(schema):
            v = self._min_one(b, depth)
            if best is None or len(v) < len(best):
                best = v
        if best is not None and len(best) > MAX_ENDING_CHARS:
            raise TooLong("the smallest value")
        if best is None:
            raise Unsatisfiable("no value satisfies the schema")
        self._smallest[id(schema)] = (schema, best)
        return best

    def _min_one(self, s: Any, depth: int) -> str:
        k = self.kind(s)
        if k == "any":
            return "0"
        if k == "enum":
            values = s["enum"] if "enum" in s else [s["const"]]
            return min((_dumps(v, self.compact) for v in values), key=len)
        if k == "null":
            return "null"
        if k == "boolean":
            return "true"
        if k in ("integer", "number"):
            return self._min_number(s, k == "integer")
        if k == "string":
            if "pattern" in s or "format" in s:
                return self._leaf(s, "")
            if int(s.get("minLength", 0)) > MAX_ENDING_CHARS:
                raise TooLong("minLength")
            return '"' + "a" * int(s.get("minLength", 0)) + '"'
        if k == "array":
            prefix = s.get("prefixItems") or []
            count = max(int(s.get("minItems", 0)), 0)
            if count > MAX_ENDING_CHARS // 2:
                raise TooLong("minItems")
            items = [self.min_value(p, depth + 1) for p in prefix[:count]]
            rest = s.get("items", True)
            if len(items) < count:
                if rest is False:
                    raise Unsupported("minItems beyond prefixItems")
                items += [self.min_value(rest, depth + 1)] * (count - len(items))
            return "[" + self.item_sep.join(items) + "]"
        props, required, extra = self._props(s)
        parts = [self._member(p, self.min_value(s["properties"][p], depth + 1)) for p in props if p in required]
        for p in [p for p in s.get("required") or [] if p not in props]:
            if extra is False:
                raise Unsatisfiable(f"property {p!r} is required but may not appear")
            parts.append(self._member(p, self.min_value(True if extra is True else extra, depth + 1)))
        if len(parts) < int(s.get("minProperties", 0)):
            raise Unsupported("minProperties")
        return "{" + self.item_sep.join(parts) + "}"

    def _member(self, key: str, value: str) -> str:
        return _dumps(key) + self.key_sep + value

    @staticmethod
    def _min_number(s: dict[str, Any], integer: bool) -> str:
        if "multipleOf" in s:
            raise Unsupported("multipleOf")
        lo, hi = s.get("minimum"), s.get("maximum")
        xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
        value: float = 0
        if lo is not None and value < lo:
            value = lo
        if xlo is not None and value <= xlo:
            value = math.floor(xlo) + 1 if integer else xlo + 1
        if hi is not None and value > hi:
            value = hi
        if xhi is not None and value >= xhi:
            value = math.ceil(xhi) - 1 if integer else xhi - 1
        if integer:
            value = math.ceil(value) if lo is not None and value == lo else value
            if value != int(value):
                raise Unsupported("integer bounds")
            return str(int(value))
        return str(int(value)) if value == int(value) else repr(float(value))

    def _leaf(self, schema: dict[str, Any], partial: str) -> str:
        if self.leaf is None:
            raise Unsupported("pattern")
        out = self.leaf(schema, partial)
        if out is None:
            raise Unsupported("pattern")
        return out

    # -- parsing the text -----------------------------------------------------------------------

    def parse(self, schema: Any, text: str, i: int, depth: int = 0) -> Iterator[Outcome]:
        """Every reading of a JSON value at ``text[i:]`` under ``schema``."""
        if depth > _MAX_DEPTH * 4:
            raise Unsupported("nesting")
        if i >= len(text):
            yield Tail(self.min_value(schema))
            return
        for b in self.branches(schema):
            yield from self._parse_one(b, text, i, depth)

    def _parse_one(self, s: Any, text: str, i: int, depth: int) -> Iterator[Outcome]:
        k = self.kind(s)
        c = text[i]
        if k == "enum":
            for value in s["enum"] if "enum" in s else [s["const"]]:
                yield from _const(_dumps(value, self.compact), text, i)
            return
        if k == "any":
            yield from self._parse_any(text, i, depth)
            return
        if k == "object":
            if c == "{":
                yield from self._parse_object(s, text, i + 1, depth)
        elif k == "array":
            if c == "[":
                yield from self._parse_array(s, text, i + 1, depth)
        elif k == "string":
            if c == '"':
                yield from self._parse_string(s, text, i)
        elif k in ("integer", "number"):
            if c == "-" or c.isdigit():
                yield from self._parse_number(s, text, i, k == "integer")
        elif k == "boolean":
            yield from _literal(text, i, ("true", "false"))
        elif k == "null":
            yield from _literal(text, i, ("null",))

    def _parse_any(self, text: str, i: int, depth: int) -> Iterator[Outcome]:
        c = text[i]
        if c == "{":
            yield from self._parse_object(True, text, i + 1, depth)
        elif c == "[":
            yield from self._parse_array(True, text, i + 1, depth)
        elif c == '"':
            yield from self._parse_string({}, text, i)
        elif c == "-" or c.isdigit():
            yield from self._parse_number({}, text, i, False)
        else:
            yield from _literal(text, i, ("true", "false", "null"))

    def _parse_string(self, s: dict[str, Any], text: str, i: int) -> Iterator[Outcome]:
        j, n = i + 1, len(text)
        count = 0
        while j < n:
            c = text[j]
            if c == '"':
                yield j + 1
                return
            if c == "\\":
                if j + 1 >= n:  # a lone backslash: `n` makes the shortest escape
                    yield Tail(self._finish_string(s, text[i:], count + 1, "n"))
                    return
                if text[j + 1] == "u":
                    hexpart = text[j + 2 : j + 6]
                    if len(hexpart) < 4:
                        yield Tail(self._finish_string(s, text[i:], count + 1, "0" * (4 - len(hexpart))))
                        return
                    j += 6
                else:
                    j += 2
            else:
                j += 1
            count += 1
        yield Tail(self._finish_string(s, text[i:], count, ""))

    def _finish_string(self, s: dict[str, Any], partial: str, count: int, escape: str) -> str:
        """Close a string whose text so far is ``partial`` (quote included) holding ``count`` characters;
        ``escape`` finishes an escape sequence the text ends inside."""
        if "pattern" in s or "format" in s:
            return self._leaf(s, partial)
        return escape + "a" * max(0, int(s.get("minLength", 0)) - count) + '"'

    def _parse_number(self, s: dict[str, Any], text: str, i: int, integer: bool) -> Iterator[Outcome]:
        m = re.compile(r"-?(?:0|[1-9][0-9]*)?(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?").match(text, i)
        assert m is not None
        j = m.end()
        tok = text[i:j]
        if j < len(text):  # the number ended: a valid one, or this reading is wrong
            if re.fullmatch(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", tok):
                yield j
            return
        # the text ends inside the number: the fewest characters that make a number in bounds
        for extra in _number_endings(tok):
            if _in_bounds(float(tok + extra), s, integer):
                yield Tail(extra)
                return

    def _parse_array(self, s: Any, text: str, i: int, depth: int) -> Iterator[Outcome]:
        prefix = s.get("prefixItems") or [] if isinstance(s, dict) else []
        rest = s.get("items", True) if isinstance(s, dict) else True
        min_items = int(s.get("minItems", 0)) if isinstance(s, dict) else 0

        def item_schema(k: int) -> Any:
            return prefix[k] if k < len(prefix) else rest

        def closing(count: int) -> str:
            missing = range(count, max(count, min_items))
            if len(missing) > MAX_ENDING_CHARS // 2:
                raise TooLong("minItems")
            extra = [self.min_value(item_schema(k)) for k in missing if k < len(prefix)]
            if len(extra) < len(missing):
                value = self.min_value(rest)
                if (len(value) + len(self.item_sep)) * (len(missing) - len(extra)) > MAX_ENDING_CHARS:
                    raise TooLong("minItems")
                extra += [value] * (len(missing) - len(extra))
            sep = self.item_sep
            return "".join(sep + v for v in extra) + "]" if count else (sep.join(extra) + "]")

        def after_item(j: int, count: int) -> Iterator[Outcome]:
            j = _skip_ws(text, j)
            if j >= len(text):
                yield Tail(closing(count))
            elif text[j] == "]":
                yield j + 1
            elif text[j] == ",":
                k = j + 1
                if k >= len(text):  # right after the comma
                    yield Tail(self.pad + self.min_value(item_schema(count)) + closing(count + 1))
                else:
                    yield from item(_skip_ws(text, k), count)

        def item(j: int, count: int) -> Iterator[Outcome]:
            for out in self.parse(item_schema(count), text, j, depth + 1):
                if isinstance(out, Tail):
                    yield Tail(out.suffix + closing(count + 1))
                else:
                    yield from after_item(out, count + 1)

        j = _skip_ws(text, i)
        if j >= len(text):
            yield Tail(closing(0))
        elif text[j] == "]":
            yield j + 1
        else:
            yield from item(j, 0)

    def _parse_object(self, s: Any, text: str, i: int, depth: int) -> Iterator[Outcome]:
        s = s if isinstance(s, dict) else {}
        props, required, extra = self._props(s) if s else ([], set(), True)

        def closing(seen: list[str], first: bool) -> str:
            start = props.index(seen[-1]) + 1 if seen and seen[-1] in props else 0
            missing = [p for p in props[start:] if p in required and p not in seen]
            parts = [self._member(p, self.min_value(s["properties"][p])) for p in missing]
            if first:
                return self.item_sep.join(parts) + "}"
            return "".join(self.item_sep + p for p in parts) + "}"

        def key_candidates(seen: list[str]) -> list[str]:
            start = props.index(seen[-1]) + 1 if seen and seen[-1] in props else 0
            out = []
            for p in props[start:]:
                if p in seen:
                    continue
                out.append(p)
                if p in required:
                    break  # a required property cannot be skipped
            return out

        def after_value(j: int, seen: list[str]) -> Iterator[Outcome]:
            j = _skip_ws(text, j)
            if j >= len(text):
                yield Tail(closing(seen, False))
            elif text[j] == "}":
                yield j + 1
            elif text[j] == ",":
                k = j + 1
                if k >= len(text):  # right after the comma
                    yield from member(len(text), seen, self.pad)
                else:
                    yield from member(_skip_ws(text, k), seen, "")

        def member(j: int, seen: list[str], lead: str) -> Iterator[Outcome]:
            """A property at ``j`` (``lead``: the rest of the separator still to write before it)."""
            if j >= len(text):
                best = self._shortest_member(s, key_candidates(seen), extra, seen, closing)
                if best is not None:
                    yield Tail(lead + best)
                return
            if text[j] != '"':
                return
            m = re.compile(r'"((?:[^"\\]|\\.)*)("?)').match(text, j)
            assert m is not None
            key, closed = m.group(1), m.group(2)
            if not closed:  # inside the key
                names = [p for p in key_candidates(seen) if p.startswith(key)]
                options = []
                for p in names:
                    value = self.min_value(s["properties"][p])
                    options.append(p[len(key) :] + '"' + self.key_sep + value + closing([*seen, p], False))
                if extra is not False and key not in props:
                    value = self.min_value(self._prop_schema(s, key) if s else True)
                    options.append('"' + self.key_sep + value + closing([*seen, key], False))
                if options:
                    yield Tail(min(options, key=len))
                return
            sub = self._prop_schema(s, key) if s else True
            k = _skip_ws(text, m.end())
            if k >= len(text):  # after the key
                yield Tail(self.key_sep + self.min_value(sub) + closing([*seen, key], False))
            elif text[k] == ":":
                v = k + 1
                if v >= len(text):  # right after the colon
                    yield Tail(self.pad + self.min_value(sub) + closing([*seen, key], False))
                    return
                for out in self.parse(sub, text, _skip_ws(text, v), depth + 1):
                    if isinstance(out, Tail):
                        yield Tail(out.suffix + closing([*seen, key], False))
                    else:
                        yield from after_value(out, [*seen, key])

        j = _skip_ws(text, i)
        if j >= len(text):
            yield Tail(closing([], True))
        elif text[j] == "}":
            yield j + 1
        else:
            yield from member(j, [], "")

    def _shortest_member(self, s: dict[str, Any], names: list[str], extra: Any, seen: list[str],
                         closing: Callable[[list[str], bool], str]) -> str | None:  # fmt: skip
        """After a separator at the end of the text: the cheapest property to write and close with."""
        options = []
        for p in names:
            options.append(self._member(p, self.min_value(s["properties"][p])) + closing([*seen, p], False))
        if extra is not False and not names:
            options.append(
                '""' + self.key_sep + self.min_value(self._prop_schema(s, "") if s else True) + closing(seen, False)
            )
        return min(options, key=len) if options else None

    def ending(self, text: str) -> str | None:
        """The shortest suffix that makes ``text`` one complete value, or None where that is not modelled.
        Raises TooLong when it is longer than ``MAX_ENDING_CHARS`` (searching the grammar is then no use)."""
        try:
            return _shortest(self.parse(self.root, text, _skip_ws(text, 0)), len(text))
        except TooLong:
            raise
        except (Unsupported, RecursionError, KeyError, TypeError, ValueError, IndexError):
            return None


def _number_endings(tok: str) -> Iterator[str]:
    """Suffixes that finish a partial JSON number, shortest first."""
    if tok in ("-", ""):
        yield "1"
        return
    if tok.endswith((".", "e", "E", "+", "-")):
        tok_end = "0"
    else:
        tok_end = ""
    yield tok_end
    if "." in tok or "e" in tok or "E" in tok:
        return
    for k in range(1, 20):  # a larger magnitude: more digits
        yield tok_end + "0" * k


def _in_bounds(value: float, s: dict[str, Any], integer: bool) -> bool:
    if integer and value != int(value):
        return False
    checks = (("minimum", value.__ge__), ("maximum", value.__le__), ("exclusiveMinimum", value.__gt__),
              ("exclusiveMaximum", value.__lt__))  # fmt: skip
    return all(check(s[k]) for k, check in checks if isinstance(s.get(k), (int, float)))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _literal(text: str, i: int, words: tuple[str, ...]) -> Iterator[Outcome]:
    rest = text[i:]
    for w in words:
        if len(rest) < len(w) and w.startswith(rest):
            yield Tail(w[len(rest) :])
        elif rest.startswith(w):
            yield i + len(w)


def _shortest(outcomes: Iterator[Outcome], end: int) -> str | None:
    best: str | None = None
    for out in outcomes:
        suffix = out.suffix if isinstance(out, Tail) else ("" if out == end else None)
        if suffix is not None and (best is None or len(suffix) < len(best)):
            best = suffix
    if best is not None and len(best) > MAX_ENDING_CHARS:
        raise TooLong("the ending")
    return best


# -- structural tags: tool calls and user formats -------------------------------------------------


class FormatEnding:
    """Shortest completions under an xgrammar structural-tag format tree (the subset agora builds:
    const_string, json_schema, sequence, or, optional, tag, tags_with_separator, triggered_tags,
    any_text)."""

    def __init__(self, fmt: dict[str, Any], leaf: LeafSolver | None = None) -> None:
        self.fmt = fmt
        self.leaf = leaf
        self._json: dict[int, JsonSchemaEnding] = {}

    def _schema(self, node: dict[str, Any]) -> JsonSchemaEnding:
        key = id(node)
        if key not in self._json:
            # a structural tag's JSON lets whitespace be left out: its endings are compact
            self._json[key] = JsonSchemaEnding(node["json_schema"], strict=True, leaf=self.leaf, compact=True)
        return self._json[key]

    def min_text(self, node: dict[str, Any]) -> str:
        t = node.get("type")
        if t == "const_string":
            return node["value"]
        if t == "json_schema":
            return self._schema(node).min_value(node["json_schema"])
        if t == "sequence":
            return "".join(self.min_text(e) for e in node["elements"])
        if t == "or":
            return min((self.min_text(e) for e in node["elements"]), key=len)
        if t == "optional":
            return ""
        if t == "tag":
            return _lit(node["begin"]) + self.min_text(node["content"]) + _lit(node["end"])
        if t in ("tags_with_separator", "triggered_tags"):
            if not node.get("at_least_one"):
                return ""
            return min((self.min_text(tag) for tag in node["tags"]), key=len)
        if t == "any_text":
            return ""
        raise Unsupported(f"format {t!r}")

    def parse(self, node: dict[str, Any], text: str, i: int) -> Iterator[Outcome]:
        t = node.get("type")
        if t == "const_string":
            yield from _const(node["value"], text, i)
        elif t == "json_schema":
            js = self._schema(node)
            yield from js.parse(node["json_schema"], text, i)
        elif t == "sequence":
            yield from self._seq(node["elements"], text, i)
        elif t == "or":
            for e in node["elements"]:
                yield from self.parse(e, text, i)
        elif t == "optional":
            yield i if i < len(text) else Tail("")
            if i < len(text):
                yield from self.parse(node["content"], text, i)
        elif t == "tag" and _free(node["content"]):
            yield from self._text_tag(_lit(node["begin"]), _lit(node["end"]), text, i)
        elif t == "tag":
            yield from self._seq([{"type": "const_string", "value": _lit(node["begin"])}, node["content"],
                                  {"type": "const_string", "value": _lit(node["end"])}], text, i)  # fmt: skip
        elif t == "tags_with_separator":
            yield from self._tags(node, text, i, 0)
        elif t == "triggered_tags":
            yield from self._triggered(node, text, i, 0)
        elif t == "any_text" and _free(node):
            yield Tail("")  # any text may stop anywhere
        else:
            raise Unsupported(f"format {t!r}")

    @staticmethod
    def _text_tag(begin: str, end: str, text: str, i: int) -> Iterator[Outcome]:
        """A tag around free text (a reasoning model's thinking): the text runs to the first ``end``."""
        for out in _const(begin, text, i):
            if isinstance(out, Tail):
                yield Tail(out.suffix + end)
                continue
            k = text.find(end, out)
            if k != -1:
                yield k + len(end)
                continue
            rest = text[out:]  # the text stops inside the tag: what is missing of the end closes it
            have = next((n for n in range(min(len(rest), len(end) - 1), 0, -1) if end.startswith(rest[-n:])), 0)
            yield Tail(end[have:])

    def _seq(self, elements: list[dict[str, Any]], text: str, i: int) -> Iterator[Outcome]:
        if not elements:
            yield i if i < len(text) else Tail("")
            return
        head, rest = elements[0], elements[1:]
        for out in self.parse(head, text, i):
            if isinstance(out, Tail):
                yield Tail(out.suffix + "".join(self.min_text(e) for e in rest))
            else:
                yield from self._seq(rest, text, out)

    def _tags(self, node: dict[str, Any], text: str, i: int, count: int) -> Iterator[Outcome]:
        need = node.get("at_least_one") and count == 0
        if i >= len(text):
            yield Tail(self.min_text({**node, "at_least_one": True}) if need else "")
            return
        if count:
            if node.get("stop_after_first"):
                yield i
                return
            sep = node["separator"]
            if not (text.startswith(sep, i) or sep.startswith(text[i:])):
                yield i
                return
            if i + len(sep) > len(text):
                yield Tail(sep[len(text) - i :] + min((self.min_text(tag) for tag in node["tags"]), key=len))
                return
            i += len(sep)
        for tag in node["tags"]:
            for out in self.parse(tag, text, i):
                if isinstance(out, Tail):
                    yield out
                else:
                    yield from self._tags(node, text, out, count + 1)

    def _triggered(self, node: dict[str, Any], text: str, i: int, count: int) -> Iterator[Outcome]:
        triggers = node["triggers"]
        need = node.get("at_least_one") and count == 0
        if count and node.get("stop_after_first"):
            yield Tail("") if i >= len(text) else i
            return
        # free text up to the next trigger
        hits = [(text.find(trig, i), trig) for trig in triggers]
        hits = [(h, trig) for h, trig in hits if h != -1]
        if not hits:
            if need:
                yield Tail(min((self.min_text(tag) for tag in node["tags"]), key=len))
            else:
                yield Tail("")
            return
        start = min(h for h, _ in hits)
        for tag in node["tags"]:
            if not _lit(tag["begin"]).startswith(tuple(trig for h, trig in hits if h == start)):
                continue
            for out in self.parse(tag, text, start):
                if isinstance(out, Tail):
                    yield out
                else:
                    yield from self._triggered(node, text, out, count + 1)

    def ending(self, text: str) -> str | None:
        try:
            return _shortest(self.parse(self.fmt, text, 0), len(text))
        except TooLong:
            raise
        except (Unsupported, RecursionError, KeyError, TypeError, ValueError, IndexError):
            return None


def _free(node: dict[str, Any]) -> bool:
    """Text without limits (``any_text`` with no excluded strings and no length cap)."""
    return node.get("type") == "any_text" and not node.get("excludes") and node.get("max_chars") is None


def _lit(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "token" and isinstance(value.get("token"), str):
        return value["token"]  # a special token: its text is in the output's bytes
    raise Unsupported("token-level tag")


def _const(value: str, text: str, i: int) -> Iterator[Outcome]:
    rest = text[i:]
    if len(rest) < len(value):
        if value.startswith(rest):
            yield Tail(value[len(rest) :])
    elif rest.startswith(value):
        yield i + len(value)


class ChoiceEnding:
    """``choice``: the shortest option that continues the text."""

    def __init__(self, options: list[str]) -> None:
        self.options = options

    def ending(self, text: str) -> str | None:
        fits = [o[len(text) :] for o in self.options if o.startswith(text)]
        return min(fits, key=len) if fits else None


# -- the fallback: search the grammar itself -------------------------------------------------------

_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\.|.", re.S)


def _unescape(tok: str) -> str:
    if tok.startswith(("\\x", "\\u", "\\U")):
        return chr(int(tok[2:], 16))
    if tok.startswith("\\"):
        return {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(tok[1], tok[1])
    return tok


def grammar_alphabet(ebnf: str) -> list[str]:
    """Characters worth trying when searching a grammar: every character of its string literals, and
    one member of each character class (the first of a class, for a negated one a common letter)."""
    chars: set[str] = set()
    i, n = 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c == '"':
            j = i + 1
            while j < n and ebnf[j] != '"':
                m = _ESCAPE.match(ebnf, j)
                assert m is not None
                chars.add(_unescape(m.group()))
                j = m.end()
            i = j + 1
        elif c == "[":
            j = i + 1
            negated = j < n and ebnf[j] == "^"
            j += negated
            toks = []
            while j < n and ebnf[j] != "]":
                m = _ESCAPE.match(ebnf, j)
                assert m is not None
                toks.append(m.group())
                j = m.end()
            i = j + 1
            vals = [_unescape(t) for t in toks]
            ranges, k = [], 0
            while k < len(vals):
                if k + 2 < len(vals) and toks[k + 1] == "-":
                    ranges.append((vals[k], vals[k + 2]))
                    k += 3
                else:
                    ranges.append((vals[k], vals[k]))
                    k += 1
            if negated:
                chars.update(next((ch for ch in "a0 _x" if not any(a <= ch <= b for a, b in ranges)), ""))
            elif ranges:
                chars.add(ranges[0][0])
        else:
            i += 1
    chars.discard("")
    return sorted(chars)


def search_ending(matcher: Any, alphabet: list[str], max_nodes: int = 3000) -> str | None:
    """The shortest string (in characters) that completes ``matcher``'s grammar, by a bounded
    best-first search: each step tries every character of ``alphabet`` on a fork, then takes the
    continuation the grammar forces. None when the budget runs out first."""
    if matcher.is_completed():
        return ""
    tie = itertools.count()
    heap: list[tuple[int, int, Any, str]] = [(0, next(tie), matcher.fork(), "")]
    seen: set[str] = set()
    nodes = 0
    while heap and nodes < max_nodes:
        _, _, m, text = heapq.heappop(heap)
        if m.is_completed():
            return text
        state = m._debug_print_internal_state()
        if state in seen:
            continue
        seen.add(state)
        for c in alphabet:
            nodes += 1
            f = m.fork()
            if not f.accept_string(c):
                continue
            forced = f.find_jump_forward_string()
            if forced and not f.accept_string(forced):
                forced = ""
            step = c + forced
            heapq.heappush(heap, (len(text) + len(step), next(tie), f, text + step))
    return None
