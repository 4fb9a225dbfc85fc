"""Intent by example utterances (the guards against jailbreaks and injections are in ``injection.py``).

Both use the same sentence embedder. Example embeddings are computed once per config
(and cached on disk under the agora cache, keyed by the texts).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from agora import envs
from agora.router.semantic.embedder import SentenceEmbedder


def cached_embeddings(embedder: SentenceEmbedder, texts: list[str], tag: str) -> np.ndarray:
    """Embeddings of ``texts``, from ``$AGORA_CACHE_DIR/semantic/`` when this exact list was seen before."""
    key = hashlib.sha256(("\x00".join(texts) + f"\x01{embedder.fingerprint}").encode()).hexdigest()[:24]
    path = envs.cache_dir() / "semantic" / f"{tag}-{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(texts), embedder.dim):
                return arr
        except (OSError, ValueError):
            pass
    arr = np.concatenate([embedder.embed(texts[i : i + 32]) for i in range(0, len(texts), 32)]) if texts else \
        np.zeros((0, embedder.dim), np.float32)  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs time
    return arr


@dataclass(frozen=True)
class Category:
    name: str
    examples: tuple[str, ...]
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class IntentResult:
    category: str | None  # None: below the threshold
    confidence: float
    method: str  # "keyword", "knn" or "none"
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.category, "confidence": round(self.confidence, 4), "method": self.method,
                "scores": {k: round(v, 4) for k, v in self.scores.items()}}  # fmt: skip


class IntentClassifier:
    """Keywords first (whole words, case-insensitive: the most hits wins), else k-nearest examples.

    The k nearest example utterances vote with their cosine similarity; a
    category's score is its share of the vote. Below ``threshold`` (or when even the
    nearest example is less similar than ``min_similarity``) there is no category.
    """

    def __init__(self, embedder: SentenceEmbedder, categories: list[Category], k: int = 7,
                 threshold: float = 0.4, min_similarity: float = 0.2) -> None:  # fmt: skip
        self.embedder, self.categories = embedder, categories
        self.k, self.threshold, self.min_similarity = k, threshold, min_similarity
        texts = [ex for c in categories for ex in c.examples]
        self.labels = np.array([i for i, c in enumerate(categories) for _ in c.examples])
        self.examples = cached_embeddings(embedder, texts, "intents")
        self.keyword_res = [
            re.compile(r"(?i)(?<!\w)(?:" + "|".join(re.escape(k) for k in c.keywords) + r")(?!\w)") if c.keywords
            else None for c in categories
        ]  # fmt: skip

    def classify(self, text: str, embedding: np.ndarray | None = None) -> IntentResult:
        hits = [len(r.findall(text)) if r is not None else 0 for r in self.keyword_res]
        if max(hits, default=0) > 0:
            best = int(np.argmax(hits))
            return IntentResult(self.categories[best].name, 1.0, "keyword",
                                {c.name: float(h) for c, h in zip(self.categories, hits, strict=True) if h})  # fmt: skip
        if not len(self.examples):
            return IntentResult(None, 0.0, "none")
        v = self.embedder.embed([text])[0] if embedding is None else embedding
        sims = self.examples @ v
        top = np.argsort(-sims)[: self.k]
        weights = np.maximum(sims[top], 0.0)
        votes = np.zeros(len(self.categories))
        np.add.at(votes, self.labels[top], weights)
        total = float(votes.sum())
        if total <= 0:
            return IntentResult(None, 0.0, "none")
        share = votes / total
        best = int(np.argmax(share))
        scores = {c.name: float(s) for c, s in zip(self.categories, share, strict=True) if s > 0}
        if share[best] < self.threshold or float(sims[top[0]]) < self.min_similarity:
            return IntentResult(None, float(share[best]), "knn", scores)
        return IntentResult(self.categories[best].name, float(share[best]), "knn", scores)
