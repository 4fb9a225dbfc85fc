"""Request models -> the engine's ``SamplingParams``; engine parameter errors -> 400s."""

from __future__ import annotations

import json

from agora.engine.sampling import ParamError, SamplingParams, StructuredOutputsParams
from agora.openai.common import SamplingFields, StructuredOutputs
from agora.openai.errors import APIError, bad_request


def structured_params(spec: StructuredOutputs, strict: bool = True) -> StructuredOutputsParams:
    """The protocol's constraint as the engine's (a JSON schema keeps its key order: it is the output's)."""
    tag = spec.structural_tag
    return StructuredOutputsParams(
        json=json.dumps(spec.json_, ensure_ascii=False) if spec.json_ is not None else None,
        json_object=bool(spec.json_object),
        regex=spec.regex,
        choice=tuple(spec.choice) if spec.choice is not None else None,
        grammar=spec.grammar,
        structural_tag=json.dumps(tag, ensure_ascii=False) if isinstance(tag, dict) else tag,
        strict=strict,
    )


def strict_schema(req: SamplingFields) -> bool:
    """json_schema's ``strict: false`` admits properties the schema does not list (JSON Schema's default)."""
    fmt = req.response_format
    return not (fmt is not None and fmt.json_schema is not None and fmt.json_schema.strict is False)


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    rename: dict[str, str] | None = None,
                    structured: StructuredOutputsParams | None = None) -> SamplingParams:  # fmt: skip
    """``rename`` maps an engine parameter name to the one this API calls it (chat: logprobs -> top_logprobs)."""
    if req.prompt_logprobs is not None and req.stream:  # vLLM's rule too
        raise bad_request("prompt_logprobs", "prompt_logprobs are not available when stream is true")
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): max(-100.0, min(100.0, v)) for k, v in req.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias", "logit_bias keys must be token ids") from None
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=req.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=bias,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=list(req.bad_words or []),
            structured_outputs=structured,
        )
    except ParamError as exc:
        raise param_error(exc, rename) from None


def param_error(exc: ParamError, rename: dict[str, str] | None = None) -> APIError:
    return bad_request((rename or {}).get(exc.param, exc.param), str(exc))
