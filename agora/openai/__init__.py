"""The protocols agora speaks, defined once (torch-free, engine-free).

``errors`` (the one error type), ``common``/``chat``/``completions``/``tokenize``
(request and response models), ``stream`` (SSE, stream <-> whole answer),
``accumulate`` (engine outputs -> chunks), ``tool_parsers`` (tool calls in and out
of model text). The server, the gateway, the semantic cache and the bench all use
these models.
"""
