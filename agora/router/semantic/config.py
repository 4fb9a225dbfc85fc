"""The ``semantic:`` section of the gateway's YAML.

::

    semantic:
      auto_model: auto                 # requests naming this model are routed by decision
      signals:
        intents:
          threshold: 0.4               # below: no category, the default decision applies
          categories:
            - name: math
              examples: ["What is the derivative of x^3?", ...]
              keywords: [integral]     # optional: a whole-word hit decides
        pii: {types: [email, phone, credit_card, iban, us_ssn, ip_address, secret]}
        jailbreak: {threshold: 0.8}
      decisions:                       # first match wins
        - name: no-jailbreaks
          when: {jailbreak: true}
          block: "prompt injection is not allowed"
        - name: math
          when: {category: [math]}
          model: gemma-3-270m
          reasoning: true              # chat_template_kwargs.enable_thinking
          system_prompt: "Think step by step."
          pii: redact                  # allow | redact | block
      default: {model: SmolLM2-135M-Instruct, pii: allow}
      cache: {enabled: true, ttl_s: 600, max_entries: 1000, similarity: 0.95}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agora.router.semantic.pii import PII_TYPES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategorySpec(_Strict):
    name: str = Field(min_length=1)
    examples: list[str] = Field(min_length=1)
    keywords: list[str] = Field(default_factory=list)


class IntentSpec(_Strict):
    categories: list[CategorySpec] = Field(default_factory=list)
    k: int = Field(7, ge=1, le=100)
    threshold: float = Field(0.4, ge=0, le=1)
    min_similarity: float = Field(0.2, ge=-1, le=1)

    @model_validator(mode="after")
    def _unique(self) -> IntentSpec:
        names = [c.name for c in self.categories]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"category {dup!r} is defined twice")
        return self


class PIISpec(_Strict):
    enabled: bool = True
    types: list[str] = Field(default_factory=lambda: list(PII_TYPES))
    default_region: str = Field("US", min_length=2, max_length=2, description="for phone numbers without +country")

    @model_validator(mode="after")
    def _types(self) -> PIISpec:
        bad = [t for t in self.types if t not in PII_TYPES]
        if bad:
            raise ValueError(f"unknown PII types {bad}; known: {', '.join(PII_TYPES)}")
        return self


class JailbreakSpec(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, ge=0, le=1, description="score at or above which the jailbreak signal is on")
    extra_patterns: list[str] = Field(default_factory=list)


class SignalsSpec(_Strict):
    intents: IntentSpec = Field(default_factory=IntentSpec)
    pii: PIISpec = Field(default_factory=PIISpec)
    jailbreak: JailbreakSpec = Field(default_factory=JailbreakSpec)


class Condition(_Strict):
    """Every condition given must hold."""

    category: list[str] | None = None
    min_confidence: float | None = Field(None, ge=0, le=1)
    pii: bool | list[str] | None = Field(None, description="true: any PII; a list: any of these types")
    jailbreak: bool | None = None


class ActionSpec(_Strict):
    model: str | None = None
    reasoning: bool | None = None
    system_prompt: str | None = None
    pii: Literal["allow", "redact", "block"] | None = None
    block: str | None = Field(None, description="refuse with 403 and this reason")


class DecisionSpec(ActionSpec):
    name: str = Field(min_length=1)
    when: Condition = Field(default_factory=Condition)


class CacheSpec(_Strict):
    enabled: bool = False
    ttl_s: float = Field(600.0, gt=0)
    max_entries: int = Field(1000, ge=1)
    similarity: float = Field(0.95, gt=0, le=1, description="cosine similarity for a semantic hit")
    include_sampled: bool = Field(False, description="also cache requests with temperature > 0")


class SemanticSpec(_Strict):
    auto_model: str = "auto"
    embedding_model: str | None = Field(None, description="folder of a BERT sentence encoder; default all-MiniLM-L6-v2")
    signals: SignalsSpec = Field(default_factory=SignalsSpec)
    decisions: list[DecisionSpec] = Field(default_factory=list)
    default: ActionSpec = Field(default_factory=ActionSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    watch_interval_s: float = Field(0.0, ge=0, description="re-read the config file when it changes (0: off)")

    @model_validator(mode="after")
    def _references(self) -> SemanticSpec:
        known = {c.name for c in self.signals.intents.categories}
        names: set[str] = set()
        for i, d in enumerate(self.decisions):
            if d.name in names:
                raise ValueError(f"decisions[{i}].name: {d.name!r} is used twice")
            names.add(d.name)
            for c in d.when.category or []:
                if c not in known:
                    raise ValueError(f"decisions[{i}].when.category: no category named {c!r} "
                                     f"(categories: {', '.join(sorted(known)) or 'none'})")  # fmt: skip
            if isinstance(d.when.pii, list):
                bad = [t for t in d.when.pii if t not in PII_TYPES]
                if bad:
                    raise ValueError(f"decisions[{i}].when.pii: unknown PII types {bad}")
            if d.block is None and d.model is None and d.pii is None and d.reasoning is None \
                    and d.system_prompt is None:  # fmt: skip
                raise ValueError(f"decisions[{i}]: does nothing (give model, reasoning, system_prompt, pii or block)")
        return self
