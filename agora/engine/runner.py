"""Turns a scheduling decision into tensors, runs the model once, samples.

All requests of a step are flattened into one token axis, so every linear layer
runs once per step on ``[T, hidden]``::

    scheduled: r0 computes 3 tokens (prefill chunk), r1 and r2 compute 1 (decode)
    input_ids : [a a a | b | c]        positions : [0 1 2 | 17 | 40]
    sample rows: last token of each request that reaches its end -> [2, 3, 4]

A request with draft tokens (speculative decoding) computes its due token and the
drafts after it, and samples at each of them: r1 with drafts x y computes [b x y] at
positions [17 18 19] and samples rows for all three; ``sampler.verify`` keeps the
drafts the model agrees with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from agora.engine.attention import AttentionMetadata, TorchPagedAttention, build_group
from agora.engine.device import zeroed
from agora.engine.sampler import SampleRequest, TokenLogprobs, sample, verify
from agora.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, list[int]]  # one token, or the accepted drafts and one more
    logprobs: dict[str, list[TokenLogprobs]]
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # the next prompt tokens'


_PROMPT_ROWS = 256  # prompt positions whose logits are computed at once (a row is a vocabulary of floats)


def prompt_logprobs(compute_logits, hidden: torch.Tensor, rows: list[int], targets: list[int],  # noqa: ANN001
                    k: list[int]) -> list[TokenLogprobs]:  # fmt: skip
    """Logprobs of ``targets`` (the prompt token after each row's position) under the raw distribution at
    ``rows`` of ``hidden``, with each row's top ``k``, a few hundred rows at a time."""
    out: list[TokenLogprobs] = []
    for at in range(0, len(rows), _PROMPT_ROWS):
        index = torch.tensor(rows[at : at + _PROMPT_ROWS], device=hidden.device)
        logp = torch.log_softmax(compute_logits(hidden[index]).float(), dim=-1)
        want = torch.tensor(targets[at : at + _PROMPT_ROWS], device=hidden.device)
        chosen = logp.gather(1, want[:, None])
        ranks = (logp > chosen).sum(dim=1) + 1
        top_k = max(k[at : at + _PROMPT_ROWS])
        top = logp.topk(top_k, dim=-1) if top_k else None
        chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for j, token in enumerate(targets[at : at + _PROMPT_ROWS]):
            n = k[at + j]
            pairs = list(zip(top_i[j][:n], top_v[j][:n], strict=True)) if n else []
            out.append(TokenLogprobs(token, chosen_l[j], ranks_l[j], pairs))
    return out


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    num_kv_heads, head_dim = model.kv_shape  # type: ignore[attr-defined]
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * num_kv_heads * head_dim * elem  # type: ignore[attr-defined]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
        enforce_eager: bool = False,
        kv_dtype: torch.dtype | None = None,
        bf16_attention: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        num_kv_heads, head_dim = model.kv_shape  # type: ignore[attr-defined]
        kv_dtype = kv_dtype or dtype
        # One block more than the pool hands out: a scratch block for the padding rows of CUDA graphs.
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: masked-out keys still pass through the matmul, and 0 * NaN = NaN.
        self.kv_caches = [
            (zeroed(shape, kv_dtype, device), zeroed(shape, kv_dtype, device))
            for _ in range(model.num_layers)  # type: ignore[attr-defined]
        ]
        layer_windows: list[int | None] = model.layer_sliding_windows  # type: ignore[attr-defined]
        self.windows = set(layer_windows)
        scale = model.attention_scale
        self.attention = TorchPagedAttention(self.kv_caches, scale, layer_windows, bf16=bf16_attention)  # type: ignore[arg-type]
        self.graphs = None
        if device.type == "cuda" and not enforce_eager:
            from agora.engine.cuda_graphs import CudaGraphDecoder

            self.graphs = CudaGraphDecoder(
                model, self.attention, block_size, max_num_seqs, -(-max_model_len // block_size),
                scratch_slot=num_blocks * block_size, device=device,
            )  # fmt: skip

    def _metadata(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[tuple[str, int, int, int]]]:
        bs = self.block_size
        prompt_rows: list[tuple[str, int, int, int]] = []  # (request id, row, next prompt token, top k)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode: list[int] = []  # indices into out.scheduled
        prefill: list[int] = []
        for i, s in enumerate(out.scheduled):
            req = s.request
            start = req.num_computed_tokens
            end = start + s.num_tokens
            drafts = s.draft_token_ids
            if req.wants_prompt_logprobs:  # rows at prompt positions p predict prompt token p + 1
                first = len(input_ids)
                for p in range(max(start, len(req.prompt_logprobs)), min(end, req.num_prompt_tokens - 1)):
                    prompt_rows.append((req.request_id, first + p - start, req.all_token_ids[p + 1],
                                              req.sampling_params.prompt_logprobs))  # fmt: skip
            input_ids.extend(req.all_token_ids[start : end - len(drafts)])
            input_ids.extend(drafts)
            positions.extend(range(start, end))
            table = s.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.samples:
                sample_rows.extend(range(len(input_ids) - 1 - len(drafts), len(input_ids)))
            (decode if s.num_tokens == 1 else prefill).append(i)

        def group(members: list[int], flat: bool):
            token_index: list[int] | None = None
            if not flat:
                token_index = []
                offset = 0
                offsets = []
                for s in out.scheduled:
                    offsets.append(offset)
                    offset += s.num_tokens
                for i in members:
                    token_index.extend(range(offsets[i], offsets[i] + out.scheduled[i].num_tokens))
            return build_group(
                token_index,
                [out.scheduled[i].num_tokens for i in members],
                [out.scheduled[i].request.num_computed_tokens for i in members],
                [out.scheduled[i].block_ids for i in members],
                bs,
                self.windows,
                self.device,
                paged_kernels=self.attention.paged_kernels,
            )

        groups = []
        if decode and prefill:
            groups = [group(decode, flat=False), group(prefill, flat=False)]
        else:
            groups = [group(decode or prefill, flat=True)]
        dev = self.device
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=dev), groups)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, sample_rows, prompt_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.is_empty:
            return RunnerOutput({}, {})
        prompt_lps: dict[str, list[TokenLogprobs]] = {}
        graphed = None
        if self.graphs is not None and not any(s.request.wants_prompt_logprobs for s in out.scheduled):
            graphed = self.graphs.run(out)  # None where no graph serves the step
        if graphed is not None:
            # Each request's due token and drafts: every row samples.
            logits = self.model.compute_logits(graphed)  # type: ignore[operator]
            sampling = [s.request for s in out.scheduled]
        else:
            ids, pos, meta, sample_rows, prompt_rows = self._metadata(out)
            hidden = self.model(ids, pos, self.attention.bind(meta))
            if prompt_rows:
                rids, rows, targets, ks = zip(*prompt_rows, strict=True)
                lps = prompt_logprobs(self.model.compute_logits, hidden, list(rows), list(targets), list(ks))
                for rid, lp in zip(rids, lps, strict=True):
                    prompt_lps.setdefault(rid, []).append(lp)
            sampling = [s.request for s in out.scheduled if s.samples]
            if not sampling:
                return RunnerOutput({}, {}, prompt_lps)
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])  # type: ignore[operator]
        reqs = [
            SampleRequest(
                r.sampling_params,
                r.prompt_token_ids,
                r.output_token_ids,
                r.eos_token_ids,
                r.sampling_params.seed,
                r.grammar,
                r.budget,
            )
            for r in sampling
        ]
        drafts = [s.draft_token_ids for s in out.scheduled if s.samples]
        if any(drafts):
            verified = verify(logits, reqs, drafts)
            sampled = {r.request_id: tokens for r, (tokens, _) in zip(sampling, verified, strict=True)}
            logprobs = {
                r.request_id: lps for r, (_, lps) in zip(sampling, verified, strict=True) if lps and lps[0] is not None
            }
            return RunnerOutput(sampled, logprobs, prompt_lps)  # type: ignore[arg-type]
        result = sample(logits, reqs)
        sampled = {r.request_id: [t] for r, t in zip(sampling, result.token_ids, strict=True)}
        logprobs = {r.request_id: [lp] for r, lp in zip(sampling, result.logprobs, strict=True) if lp is not None}
        return RunnerOutput(sampled, logprobs, prompt_lps)
