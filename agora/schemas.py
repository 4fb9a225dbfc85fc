"""JSON Schema checks shared by the protocol layer (tool parameters) and the grammar compiler
(response formats, structured outputs): a schema must be valid JSON Schema and not nested too deeply.
Imports no part of agora."""

from __future__ import annotations

from typing import Any

MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in a schema


def nesting_depth(node: Any, limit: int) -> int:
    """How deeply dicts and lists nest in ``node`` (counting stops just past ``limit``)."""
    depth, level = 0, [node]
    while level:
        depth += 1
        if depth > limit:
            return depth
        nxt: list[Any] = []
        for x in level:
            if isinstance(x, dict):
                nxt.extend(v for v in x.values() if isinstance(v, (dict, list)))
            elif isinstance(x, list):
                nxt.extend(v for v in x if isinstance(v, (dict, list)))
        level = nxt
    return depth


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` cannot be used (None when it can)."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        return "a JSON schema must be an object (or true / false)"
    if nesting_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        return f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
    return None
