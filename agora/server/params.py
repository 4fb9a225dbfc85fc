"""Request models -> the engine's ``SamplingParams``; engine parameter errors -> 400s."""

from __future__ import annotations

from agora.engine.sampling import ParamError, SamplingParams
from agora.openai.common import SamplingFields
from agora.openai.errors import APIError, bad_request


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    rename: dict[str, str] | None = None) -> SamplingParams:  # fmt: skip
    """``rename`` maps an engine parameter name to the one this API calls it (chat: logprobs -> top_logprobs)."""
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
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=bias,
        )
    except ParamError as exc:
        raise param_error(exc, rename) from None


def param_error(exc: ParamError, rename: dict[str, str] | None = None) -> APIError:
    return bad_request((rename or {}).get(exc.param, exc.param), str(exc))
