"""Pieces every OpenAI-style request and response shares.

Requests refuse unknown fields (as OpenAI does); responses keep extra fields, so the
gateway can parse another server's answer (vLLM adds its own) and replay it whole.
Optional response fields marked with :func:`omitted` leave the JSON when they are None.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, field_validator, model_validator

from agora.openai.errors import APIError, bad_request

# The gateway's priority bands, most urgent first: it names a request's band to the engines in x-agora-priority,
# and an engine scheduling by priority serves a band before the next (a request's own priority orders it within).
PRIORITY_BANDS = ("interactive", "batch", "sheddable")

# Bounds on what a client controls in the structured-output fields (bytes of JSON or text).
MAX_SCHEMA_BYTES = 64 << 10
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_BYTES = 64 << 10
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024


def new_id(prefix: str, nbytes: int = 24) -> str:
    """A random object id in the API's style: ``resp_…``, ``msg_…``, ``toolu_…``."""
    return f"{prefix}_{secrets.token_hex(nbytes)}"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(body: bytes, data: Any = None) -> str | None:
    """Where a JSON body holds a lone UTF-16 surrogate, as a dotted path (``messages.0.content``); else None.

    JSON writes characters outside the basic plane as escaped surrogate pairs, and a client that cuts a
    string between the two halves (a JavaScript ``slice`` through an emoji) sends half a character. That
    is not text: tokenizers and grammar compilers refuse it. Only bodies with such an escape are looked
    through: ``data``, the body already parsed, or else parsed here (a body that does not parse is left to
    the JSON reader's own error).
    """
    if not _SURROGATE_ESCAPE.search(body):
        return None
    if data is None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(node, dict):
            for key, value in reversed(node.items()):  # the first field first: it is popped first
                stack.append((value, f"{path}.{key}" if path else str(key)))
                stack.append((key, f"{path}.{key}" if path else str(key)))
        elif isinstance(node, list):
            stack.extend((value, f"{path}.{i}" if path else str(i)) for i, value in reversed(list(enumerate(node))))
    return None


def surrogate_error(path: str) -> APIError:
    """The 400 for the parameter ``lone_surrogate`` found."""
    return bad_request(path, f"{path}: holds half of a UTF-16 surrogate pair (an escape between \\ud800 and "
                             "\\udfff without its other half), which is not text; send whole characters")  # fmt: skip


def not_json_type(content_type: bytes | None) -> str | None:
    """The content type of a body sent as something other than JSON (a form, text), or None when it is JSON
    or unnamed (read as JSON, as FastAPI does)."""
    kind = (content_type or b"").split(b";")[0].strip().lower().decode("latin-1")
    if not kind or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return None
    return kind


def not_json_error(kind: str) -> APIError:
    """The 415 for a body sent as ``kind`` (what ``not_json_type`` found)."""
    return APIError(415, f"the request body must be JSON, sent with content-type: application/json (it came as "
                         f"{kind[:100]}; with curl, add -H 'content-type: application/json')",
                    code="unsupported_media_type")  # fmt: skip


DEEP_JSON = "the request body nests too deeply to read (about 1000 levels at most)"


def json_object(body: bytes, content_type: bytes | None = None) -> dict[str, Any]:
    """A request body that must be one JSON object, or the APIError that says why it is not: 415 for a body
    sent as something other than JSON (``content_type``, when given), 400 for any other fault."""
    if body and (kind := not_json_type(content_type)) is not None:
        raise not_json_error(kind)
    if not body.strip():
        raise bad_request(None, "the request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request(None, "the request body is not valid JSON") from None
    except ValueError as exc:  # a number of more digits than Python reads
        raise bad_request(None, f"the request body is not valid JSON: {str(exc).split(';')[0]}") from None
    except RecursionError:
        raise bad_request(None, DEEP_JSON) from None
    if not isinstance(data, dict):
        raise bad_request(None, f"the request body must be a JSON object, not {_JSON_TYPES.get(type(data), 'null')}")
    return data


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def telling_error(errors: list[Any]) -> dict[str, Any]:
    """Of pydantic's errors about the first parameter it faults, the one that says most: the deepest.

    A value that fits no branch of a union (``str | list[Item]``) gets one error per branch, and
    the first is the plain string's ("Input should be a valid string") even when the client sent
    a list and one item in it is wrong; the error about that item lies deepest.
    """
    if not errors:
        return {}

    def where(error: dict[str, Any]) -> tuple[Any, ...]:
        loc = tuple(error.get("loc", ()))
        return loc[1:] if loc[:1] == ("body",) else loc  # FastAPI puts a request body's errors under "body"

    top = where(errors[0])[:1]
    return max((e for e in errors if where(e)[:1] == top), key=lambda e: len(where(e)))


def error_words(error: dict[str, Any], default: object = "invalid value") -> str:
    """One pydantic error's message, without the "Value error, " pydantic puts before a validator's own words."""
    return str(error.get("msg", default)).removeprefix("Value error, ")


def first_error(exc: Exception) -> str:
    """pydantic's most telling complaint, with where it is (``messages.0.content: ...``)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = telling_error(errors())
        where = ".".join(str(x) for x in first.get("loc", ()))
        said = error_words(first, exc)
        return f"{where}: {said}" if where else said
    return str(exc)


# Content parts that carry media rather than text, in any of the three APIs.
MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "document",
                         "video_url", "input_video"})  # fmt: skip


def text_parts_only(*fields: str, accepted: tuple[str, ...]) -> Any:
    """A validator refusing, by its type, a part of ``fields``' content lists that is not in ``accepted``.

    Without it pydantic reports the union's first branch ("Input should be a valid string") for an
    image, which tells a client nothing. Media parts say the server reads text only.
    """

    def check(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind in accepted:
                continue
            if kind in MEDIA_PARTS:
                raise ValueError(f"part {i} is {kind!r} content: the models this server runs read text only")
            names = ", ".join(repr(a) for a in accepted)
            raise ValueError(f"part {i} has type {kind[:64]!r}; a part here is one of {names}")
        return value

    return field_validator(*fields, mode="before")(check)


def _is_none(value: Any) -> bool:
    return value is None


def omitted(default: Any = None) -> Any:
    """A response field left out of the JSON while it is None."""
    return Field(default=default, exclude_if=_is_none)


class StrictModel(BaseModel):
    """A request body (or part of one): unknown fields are a 400."""

    model_config = ConfigDict(extra="forbid")


class OpenModel(BaseModel):
    """A response (or part of one): extra fields are kept, so other servers' answers round-trip."""

    model_config = ConfigDict(extra="allow")

    def to_json(self) -> str:
        return self.model_dump_json()


Number = Annotated[float, Field(allow_inf_nan=False)]


# -- usage and logprobs (responses) ------------------------------------------------------


class PromptTokensDetails(OpenModel):
    cached_tokens: int = 0


class CompletionTokensDetails(OpenModel):
    reasoning_tokens: int = 0


class Usage(OpenModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = omitted()
    completion_tokens_details: CompletionTokensDetails | None = omitted()  # a reasoning model's

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int, reasoning: int | None = None) -> Usage:
        details = CompletionTokensDetails(reasoning_tokens=reasoning) if reasoning is not None else None
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                   completion_tokens_details=details)  # fmt: skip


class TopLogprob(OpenModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(OpenModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# -- request fields shared by chat and completions ------------------------------------------


class StreamOptions(StrictModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage so far on every chunk


class JSONSchemaSpec(StrictModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs`` field: exactly one constraint."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None
    structural_tag: str | dict[str, Any] | None = None

    @field_validator("json_", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str):  # vLLM also takes the schema as a JSON string
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)") from None
        return value


def check_structured_outputs(spec: StructuredOutputs, param: str) -> None:
    """Sizes and shapes a compiler must never see; raises the 400 that names ``param``."""
    given = [k for k in ("json_", "regex", "choice", "grammar", "structural_tag") if getattr(spec, k) is not None]
    if spec.json_object:
        given.append("json_object")
    if len(given) != 1:
        names = ", ".join(k.rstrip("_") for k in given) or "none"
        raise bad_request(param, f"{param} takes exactly one of json, regex, choice, grammar, json_object, "
                                 f"structural_tag (got {names})")  # fmt: skip
    if spec.json_ is not None and len(json.dumps(spec.json_)) > MAX_SCHEMA_BYTES:
        raise bad_request(param, f"{param}: the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    if spec.regex is not None and not 0 < len(spec.regex) <= MAX_REGEX_CHARS:
        raise bad_request(param, f"{param}: regex must have 1 to {MAX_REGEX_CHARS} characters")
    if spec.grammar is not None and not 0 < len(spec.grammar.encode()) <= MAX_GRAMMAR_BYTES:
        raise bad_request(param, f"{param}: grammar must have 1 to {MAX_GRAMMAR_BYTES} bytes")
    if spec.choice is not None:
        if not spec.choice:
            raise bad_request(param, f"{param}: choice must not be empty")
        if len(spec.choice) > MAX_CHOICES or any(not c or len(c) > MAX_CHOICE_CHARS for c in spec.choice):
            raise bad_request(param, f"{param}: choice takes 1 to {MAX_CHOICES} non-empty strings of at most "
                                     f"{MAX_CHOICE_CHARS} characters")  # fmt: skip
    if spec.structural_tag is not None and len(json.dumps(spec.structural_tag)) > MAX_SCHEMA_BYTES:
        raise bad_request(param, f"{param}: structural_tag is larger than {MAX_SCHEMA_BYTES} bytes")


def check_prompt_cache(retention: Any, options: Any) -> None:
    """OpenAI's prompt-cache settings: agora caches every prefix of every prompt, in memory only (so
    ``prompt_cache_retention: "in_memory"`` holds); a longer retention or explicit breakpoints it cannot promise."""
    if retention not in (None, "in_memory"):
        raise bad_request("prompt_cache_retention", "prompt_cache_retention: only 'in_memory' is available (every "
                                                    "prefix is cached in memory, for as long as memory allows)")  # fmt: skip
    if options is not None:
        raise bad_request("prompt_cache_options", "prompt_cache_options is not supported: every prefix is cached "
                                                  "automatically")  # fmt: skip


class SamplingFields(StrictModel):
    """Fields of both chat and text completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    frequency_penalty: Number = 0.0
    presence_penalty: Number = 0.0
    logit_bias: dict[str, Number] | None = None
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    user: str | None = Field(default=None, max_length=256)
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling parameters
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None  # vLLM's: each prompt token's logprob and the top k there
    cache_salt: str | None = Field(default=None, max_length=256)
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: StrictInt | None = None  # keep the prompt's last k tokens (-1: the context length)
    return_token_ids: StrictBool | None = None  # the prompt's and each choice's token ids beside the text
    return_tokens_as_token_ids: StrictBool | None = None  # logprobs name tokens "token_id:{id}"
    request_id: str | None = Field(default=None, min_length=1, max_length=128)  # the answer's id carries it
    best_of: StrictInt | None = None
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0
    priority: StrictInt = Field(default=0, ge=-(2**31), le=2**31 - 1)  # lower first (--scheduling-policy priority)
    spaces_between_special_tokens: StrictBool = True
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spelling of structured_outputs, still sent by many clients
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def stream_usage(self) -> tuple[bool, bool]:
        """(usage chunk at the end, usage on every chunk)."""
        opts = self.stream_options
        if opts is None:
            return False, False
        return opts.include_usage or opts.continuous_usage_stats, opts.continuous_usage_stats

    def check_common(self) -> None:
        """The 400s that do not depend on the engine's limits."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "stream_options is only allowed when stream is true")
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise bad_request("guided_decoding_backend", "guided_decoding_backend: only 'xgrammar' is available")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of", "best_of is not supported (only best_of equal to n)")
        if self.use_beam_search:
            raise bad_request("use_beam_search", "beam search is not supported")
        if self.length_penalty != 1.0:
            raise bad_request("length_penalty", "length_penalty applies to beam search, which is not supported")
        if not self.spaces_between_special_tokens:
            raise bad_request("spaces_between_special_tokens", "spaces_between_special_tokens: false is not "
                                                               "supported (special tokens decode as the tokenizer "
                                                               "writes them)")  # fmt: skip
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1 \
                and self.truncate_prompt_tokens != -1:  # fmt: skip
            raise bad_request("truncate_prompt_tokens", "truncate_prompt_tokens must be -1 (the context length) "
                                                        "or at least 1")  # fmt: skip

    _constraint: Any = PrivateAttr(default=None)
    _constraint_known: bool = PrivateAttr(default=False)  # None is a valid answer: remember having asked

    def constraint(self) -> tuple[StructuredOutputs, str] | None:
        """The output constraint the request asks for, and the parameter it came from (None: free text).
        Worked out (and size-checked) once per request, however many layers ask."""
        if not self._constraint_known:
            self._constraint, self._constraint_known = self._find_constraint(), True
        return self._constraint

    def _find_constraint(self) -> tuple[StructuredOutputs, str] | None:
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        guided = {k: v for k, v in guided.items() if v is not None}
        sources: list[tuple[StructuredOutputs, str]] = []
        if self.structured_outputs is not None:
            sources.append((self.structured_outputs, "structured_outputs"))
        if guided:
            if len(guided) > 1:
                raise bad_request(f"guided_{next(iter(guided))}", "give only one of guided_json, guided_regex, "
                                                                  "guided_choice, guided_grammar")  # fmt: skip
            ((kind, value),) = guided.items()
            try:
                sources.append((StructuredOutputs.model_validate({kind: value}), f"guided_{kind}"))
            except ValueError as exc:
                raise bad_request(f"guided_{kind}", f"guided_{kind}: {exc}") from None
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            sources.append((StructuredOutputs(json_object=True), "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None
            schema = fmt.json_schema.schema_
            spec = StructuredOutputs(json_object=True) if schema is None else StructuredOutputs(json=schema)
            sources.append((spec, "response_format"))
        if len(sources) > 1:
            raise bad_request(sources[1][1], f"{sources[0][1]} and {sources[1][1]} both constrain the output; "
                                             "give one")  # fmt: skip
        if not sources:
            return None
        check_structured_outputs(*sources[0])
        return sources[0]
