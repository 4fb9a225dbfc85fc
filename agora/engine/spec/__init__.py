"""Speculative decoding's drafting side: proposers that guess the next tokens from the context.

A proposer sees a sequence's tokens after each step and offers up to ``max_tokens`` drafts
for the next one. The scheduler grants them as budget (``1 + len(drafts)`` tokens), the
runner computes logits at every draft position in the same forward, and the sampler keeps
the longest prefix the model agrees with plus one token of its own (``sampler.verify``),
so a step yields 1 to ``1 + len(drafts)`` tokens and the output is what it would have been
without speculation. How many of the drafts are worth verifying is ``policy``'s call.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agora.config import SpeculativeConfig


class Proposer(Protocol):
    """``salt`` is the request's prefix-cache salt (its tenant, and its own ``cache_salt``): what a proposer
    learns from one salt's requests drafts only for requests of the same salt. A draft that matches is
    verified faster, so drafting from another tenant's outputs would let a request's speed tell whether
    another tenant recently generated its continuation (as a shared prefix cache would tell about prompts)."""

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int, salt: str | None = None) -> list[int]:
        """Up to ``max_tokens`` guesses of what follows ``token_ids`` (prompt and output so far)."""
        ...

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, salt: str | None = None) -> None:
        """The sequence is done (or gone): forget it, or learn from its output."""
        ...


def build_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "ngram":
        from agora.engine.spec.ngram import NgramProposer

        return NgramProposer(config)
    from agora.engine.spec.suffix import SuffixProposer

    return SuffixProposer(config)


@dataclass
class SpecStats:
    """Counters under vLLM's metric names (``vllm:spec_decode_*``)."""

    num_drafts: int = 0  # verification steps of a sequence that had drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts accepted at position i

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafts:
            self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def copy(self) -> SpecStats:
        return SpecStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, list(self.accepted_per_pos))
