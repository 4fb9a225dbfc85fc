"""Signals -> decision -> a rewritten request (or a refusal, or a cached answer).

::

    body ─▶ texts ─▶ signals: intent (last user message), PII (every message),
                              jailbreak (user text; system too if asked), injection (tool results:
                              chat role tool, Responses function_call_output, Anthropic tool_result),
                              each finding labeled with where it was (segments.py)
          ─▶ first decision whose conditions all hold (else the default)
          ─▶ block (403) | flag (x-agora-flagged, audit flags) | quarantine (the tool results found
             replaced by a notice) | PII policy: allow / redact / block (403)
          ─▶ model "auto" only: target model, reasoning (chat_template_kwargs.enable_thinking),
             system prompt
          ─▶ semantic cache lookup on the final request

Signals are separate from decisions: the same signals can feed any policy, and
``POST /v1/classify`` returns them as they are. A request naming a real model keeps
it and its messages' instructions, but still passes the guards (block, PII).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agora.openai.errors import APIError
from agora.router.request import content_text, conversation
from agora.router.semantic.cache import Answer, CacheKey, SemanticCache
from agora.router.semantic.config import ActionSpec, Condition, SemanticSpec
from agora.router.semantic.embedder import SentenceEmbedder, default_embedder
from agora.router.semantic.injection import InjectionDetector
from agora.router.semantic.pii import PIIDetector, PIISpan
from agora.router.semantic.segments import Segment, replace, segments
from agora.router.semantic.signals import Category, IntentClassifier, IntentResult

MAX_CLASSIFY_CHARS = 4000  # the encoder reads 256 tokens; more text only costs time


@dataclass(frozen=True)
class Finding:
    """One scanned text's score, and where it was."""

    where: str  # user, system, tool
    path: str  # e.g. messages[3]
    score: float
    rules: tuple[str, ...]
    keys: tuple[Any, ...] = ()
    call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "path": self.path, "score": round(self.score, 4), "rules": list(self.rules),
                **({"call_id": self.call_id} if self.call_id else {})}  # fmt: skip


@dataclass
class GuardResult:
    """A guard signal: the highest-scoring text it read, every text at or above the threshold, and whether
    that makes the signal on."""

    score: float
    threshold: float
    findings: list[Finding]  # at or above the threshold
    top: Finding | None
    on: bool

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "threshold": round(self.threshold, 4), "detected": self.on,
                "rules": list(self.top.rules) if self.top else [], "where": self.top.where if self.top else None,
                "path": self.top.path if self.top else None, "findings": [f.to_dict() for f in self.findings]}  # fmt: skip


@dataclass
class Signals:
    intent: IntentResult | None
    pii: list[PIISpan]
    jailbreak: GuardResult | None
    injection: GuardResult | None = None

    @property
    def jailbreak_on(self) -> bool:
        return self.jailbreak is not None and self.jailbreak.on

    @property
    def injection_on(self) -> bool:
        return self.injection is not None and self.injection.on

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        return {
            "category": self.intent.to_dict() if self.intent else None,
            "pii": [s.to_dict(with_text) for s in self.pii],
            "jailbreak": self.jailbreak.to_dict() if self.jailbreak else None,
            "injection": self.injection.to_dict() if self.injection else None,
        }


@dataclass
class Outcome:
    decision: str
    signals: Signals
    body: dict[str, Any]  # the request to forward (a copy when anything changed)
    headers: dict[str, str]
    error: APIError | None = None
    cache_key: CacheKey | None = None
    cached: tuple[Answer, str] | None = None  # (answer, "exact" | "semantic")
    embedding: np.ndarray | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # for the audit record: what was flagged or quarantined


def request_texts(body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[str, str, list[str]]:
    """(intent text, guard text, every text) of a request of any of the APIs."""
    messages = conversation(path, body)
    if messages is not None:
        msgs = messages
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
        intent = content_text(msgs[last_user].get("content"), "\n") if last_user is not None else ""
        tail = msgs[last_user:] if last_user is not None else msgs[-1:]
        guard = "\n".join(content_text(m.get("content"), "\n") for m in tail)
        return intent, guard, [content_text(m.get("content"), "\n") for m in msgs]
    prompt = body.get("prompt")
    prompts = [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]
    text = prompts[0] if prompts else ""
    return text, text, prompts


class SemanticRouter:
    def __init__(self, spec: SemanticSpec, embedder: SentenceEmbedder | None = None) -> None:
        self.spec = spec
        s = spec.signals
        needs_embedder = bool(s.intents.categories) or spec.cache.enabled
        self.embedder = embedder or (default_embedder(spec.embedding_model) if needs_embedder else None)
        self.intents = None
        if s.intents.categories:
            cats = [Category(c.name, tuple(c.examples), tuple(c.keywords)) for c in s.intents.categories]
            self.intents = IntentClassifier(self.embedder, cats, s.intents.k, s.intents.threshold,
                                            s.intents.min_similarity)  # fmt: skip
        self.pii = PIIDetector(s.pii.types, s.pii.default_region) if s.pii.enabled else None
        self.guard = InjectionDetector(max_embedded=s.injection.max_encoder_windows,
                                       extra_patterns=tuple(s.jailbreak.extra_patterns)) \
            if s.jailbreak.enabled or s.injection.enabled else None  # fmt: skip
        self.cache = SemanticCache(spec.cache) if spec.cache.enabled else None

    # -- signals ----------------------------------------------------------------------

    def _embed(self, text: str) -> np.ndarray | None:
        return self.embedder.embed([text[:MAX_CLASSIFY_CHARS]])[0] if self.embedder is not None else None

    def signals(self, intent_text: str, guard_text: str, texts: list[str],
                segs: list[Segment] | None = None) -> tuple[Signals, np.ndarray | None]:  # fmt: skip
        """``segs``: the request's texts with where they were (default: ``guard_text`` as the user's)."""
        embedding = self._embed(intent_text) if (self.intents or self.cache) else None
        intent = self.intents.classify(intent_text[:MAX_CLASSIFY_CHARS], embedding) if self.intents else None
        spans = [s for t in texts for s in self.pii.find(t)] if self.pii else []
        jailbreak = injection = None
        if self.guard is not None:
            if segs is None:
                segs = [Segment("user", "text", (), guard_text)] if guard_text.strip() else []
            s = self.spec.signals
            kinds = [(s.jailbreak, "jailbreak"), (s.injection, "injection")]
            wanted = [seg for seg in segs if any(spec.enabled and seg.where in spec.scan for spec, _ in kinds)]
            scores = self.guard.scan([seg.text for seg in wanted])
            found = [Finding(seg.where, seg.path, sc.score, sc.rules, seg.keys, seg.call_id)
                     for seg, sc in zip(wanted, scores, strict=True)]  # fmt: skip
            results = {}
            for spec, name in kinds:
                if not spec.enabled:
                    continue
                threshold = spec.threshold if spec.threshold is not None else self.guard.threshold
                mine = [f for f in found if f.where in spec.scan]
                top = max(mine, key=lambda f: f.score, default=None)
                hits = [f for f in mine if f.score >= threshold]
                results[name] = GuardResult(top.score if top else 0.0, threshold, hits, top, bool(hits))
            jailbreak, injection = results.get("jailbreak"), results.get("injection")
        return Signals(intent, spans, jailbreak, injection), embedding

    def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/classify``: ``{"text": ...}`` or ``{"messages": [...]}`` -> signals and the decision."""
        if isinstance(body.get("text"), str):
            intent_text = guard = body["text"]
            texts = [body["text"]]
        elif isinstance(body.get("messages"), list) or isinstance(body.get("prompt"), (str, list)):
            intent_text, guard, texts = request_texts(body)
        else:
            raise APIError(400, "give text (a string) or messages (a list)", param="text")
        sig, _ = self.signals(intent_text, guard, texts)
        name, _ = self.decide(sig)
        return {**sig.to_dict(with_text=True), "decision": name}

    # -- decisions --------------------------------------------------------------------

    @staticmethod
    def _holds(when: Condition, sig: Signals) -> bool:
        category = sig.intent.category if sig.intent else None
        if when.category is not None and category not in when.category:
            return False
        if when.min_confidence is not None and (sig.intent is None or sig.intent.confidence < when.min_confidence):
            return False
        if when.pii is not None:
            found = {s.type for s in sig.pii}
            wanted = bool(found) if isinstance(when.pii, bool) else bool(found & set(when.pii))
            if wanted != (when.pii is not False):
                return False
        if when.injection is not None and when.injection != sig.injection_on:
            return False
        return when.jailbreak is None or when.jailbreak == sig.jailbreak_on

    def decide(self, sig: Signals) -> tuple[str, ActionSpec]:
        for d in self.spec.decisions:
            if self._holds(d.when, sig):
                return d.name, d
        return "default", self.spec.default

    # -- the whole pass ------------------------------------------------------------------

    def process(self, path: str, body: dict[str, Any], tenant: str) -> Outcome:
        intent_text, guard, texts = request_texts(body, path)
        segs = segments(path, body)
        sig, embedding = self.signals(intent_text, guard, texts, segs)
        name, action = self.decide(sig)
        default = self.spec.default
        category = sig.intent.category if sig.intent and sig.intent.category else "none"
        headers = {"x-agora-decision": name, "x-agora-category": category}
        if sig.pii:
            headers["x-agora-pii"] = ",".join(sorted({s.type for s in sig.pii}))
        guards_on = [(signal, result) for signal, result in (("jailbreak", sig.jailbreak), ("injection", sig.injection))
                     if result is not None and result.on]  # fmt: skip
        for signal, result in guards_on:  # where each was found, for the client and the audit
            headers[f"x-agora-{signal}"] = ",".join(f"{f.path}={f.score:.3f}" for f in result.findings)
        out = Outcome(name, sig, body, headers, embedding=embedding)
        if self.guard is not None:
            out.notes["windows_scanned"] = self.guard.windows_scanned
        if action.flag:
            headers["x-agora-flagged"] = name
            out.flags += [f"{signal}:{f.path}:{f.score:.3f}" for signal, result in guards_on for f in result.findings]
        if action.block is not None:
            out.error = APIError(403, f"request blocked by policy {name!r}: {action.block}", "permission_error",
                                 code="blocked_by_policy", headers=headers)  # fmt: skip
            return out
        policy = action.pii or default.pii or "allow"
        if sig.pii and policy == "block":
            types = headers["x-agora-pii"]
            out.error = APIError(403, f"request blocked by policy {name!r}: it contains personal data ({types})",
                                 "permission_error", code="pii_blocked", headers=headers)  # fmt: skip
            return out
        new = None
        if sig.pii and policy == "redact":
            new = copy.deepcopy(body)
            self._redact(new)
        if action.quarantine and sig.injection is not None and sig.injection.findings:
            new = new or copy.deepcopy(body)
            notice = self.spec.signals.injection.quarantine_notice
            for f in sig.injection.findings:
                replace(new, f.keys, notice)
            headers["x-agora-quarantined"] = ",".join(f.path for f in sig.injection.findings)
            out.flags += [f"quarantined:{f.path}:{f.score:.3f}" for f in sig.injection.findings]
        is_auto = body.get("model") == self.spec.auto_model
        if is_auto:
            model = action.model or default.model
            if model is None:
                out.error = APIError(400, f"model {self.spec.auto_model!r}: decision {name!r} names no model and "
                                     "the default has none", param="model", headers=headers)  # fmt: skip
                return out
            new = new or copy.deepcopy(body)
            new["model"] = model
            reasoning = action.reasoning if action.reasoning is not None else default.reasoning
            # the chat template's switch, unless the client chose with reasoning_effort (which engines map onto it)
            if path.endswith("/chat/completions") and reasoning is not None and body.get("reasoning_effort") is None:
                kwargs = new.get("chat_template_kwargs") if isinstance(new.get("chat_template_kwargs"), dict) else {}
                new["chat_template_kwargs"] = {**kwargs, "enable_thinking": reasoning}
            prompt = action.system_prompt or default.system_prompt
            if prompt:
                _add_system_prompt(path, new, prompt)
        if new is not None:
            out.body = new
        headers["x-agora-model"] = str(out.body.get("model"))
        if self.cache is not None:
            out.cache_key = self.cache.key(path, out.body, tenant)
            if out.cache_key is not None:
                # the embedding is of the original user text: a redacted request can only match exactly
                same = out.cache_key.text is not None and out.cache_key.text == intent_text
                out.embedding = embedding if same else None
                out.cached = self.cache.lookup(out.cache_key, out.embedding)
        return out

    def _redact(self, body: dict[str, Any]) -> None:
        """Personal data out of every text of the request, whichever API's shape it has."""
        assert self.pii is not None
        redact = self.pii.redact

        def parts(content: Any) -> Any:
            if isinstance(content, str):
                return redact(content)
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = redact(part["text"])
                    elif isinstance(part, dict) and "content" in part:  # Anthropic's tool_result blocks
                        part["content"] = parts(part["content"])
            return content

        def fields(obj: Any, keys: tuple[str, ...]) -> None:
            for key in keys if isinstance(obj, dict) else ():
                if key in obj:
                    obj[key] = parts(obj[key])

        fields(body, ("system", "instructions"))  # Anthropic's system prompt; the Responses API's
        for m in body.get("messages") if isinstance(body.get("messages"), list) else []:
            fields(m, ("content",))
        items = body.get("input")
        if isinstance(items, str):
            body["input"] = redact(items)
        for item in items if isinstance(items, list) else []:
            fields(item, ("content", "output"))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = redact(prompt)
        elif isinstance(prompt, list):
            body["prompt"] = [redact(p) if isinstance(p, str) else p for p in prompt]


def _add_system_prompt(path: str, body: dict[str, Any], prompt: str) -> None:
    """The decision's system prompt, first, where each API keeps its system prompt."""
    if path.endswith("/responses"):
        body["instructions"] = f"{prompt}\n\n{body['instructions']}" if body.get("instructions") else prompt
        return
    if path.endswith("/v1/messages"):
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [{"type": "text", "text": prompt}, *system]
        else:
            body["system"] = f"{prompt}\n\n{system}" if system else prompt
        return
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return
    if (
        msgs
        and isinstance(msgs[0], dict)
        and msgs[0].get("role") == "system"
        and isinstance(msgs[0].get("content"), str)
    ):
        msgs[0] = {**msgs[0], "content": f"{prompt}\n\n{msgs[0]['content']}"}
    else:
        msgs.insert(0, {"role": "system", "content": prompt})
