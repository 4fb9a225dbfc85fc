"""Prompt-injection and jailbreak detection that generalizes: a classifier trained on agora's labeled set.

::

    text ─▶ normalize (leetspeak, spaced letters, case) ─▶ windows of ~64 words
         ─▶ rules (regexes: a hit scores 1)
         ─▶ lexical model on every window (hashed word 1-2-grams, logistic regression: microseconds)
         ─▶ the windows it does not clear (p >= gate), at most ``max_embedded`` of them, the likeliest
            first: the sentence embedding (all-MiniLM-L6-v2, numpy) ─▶ embedding model; both models'
            logits ─▶ a stacked logistic regression: the calibrated score
         score = the highest window's

Both models and the stacker are logistic regressions trained on the ``train`` split of
``data/injection.tsv`` (``benchmarks/semantic/make_injection_set.py`` writes it). The stacker is
fitted on out-of-fold predictions, and the shipped threshold is chosen there too, so the held-out
split (``benchmarks/injection_eval.py``) never informs training. Training is deterministic and
takes about a minute (``make_injection_set.py --train``); the gateway loads the committed result,
``data/injection_model.npz`` (32 KB).

The cost is bounded: the lexical pass is linear in the text (a 1 MB tool result in under a second
here, every window read), and at most ``max_embedded`` windows per call go through the encoder.
"""

from __future__ import annotations

import hashlib
import re
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from agora.router.semantic.embedder import SentenceEmbedder
from agora.router.semantic.signals import cached_embeddings

WINDOW_WORDS = 64  # a window the encoder reads whole (~100 tokens)
STRIDE_WORDS = 48  # windows overlap, so a sentence across a boundary is seen whole in one of them
_BUCKETS = 1 << 16  # hashed n-gram features
_FOLDS = 5
_REMEMBERED = 50_000  # texts whose score is kept
_MAX_FALSE_POSITIVES = 0.05  # the shipped threshold's false-positive rate on out-of-fold training scores

_RULES = (
    ("override", re.compile(r"(?i)\b(ignore|disregard|forget|override|drop|cancel)\b[^.\n]{0,40}\b(previous|prior|above|earlier|all|your|the)\b[^.\n]{0,30}\b(instructions?|rules|prompts?|guidelines|directives)\b")),
    ("prompt_extraction", re.compile(r"(?i)\b(reveal|print|show|repeat|output|leak|dump)\b[^.\n]{0,40}\b(system prompt|hidden (instructions|prompt)|initial instructions|developer message)\b")),
    ("persona_unbound", re.compile(r"(?i)\b(DAN|do anything now|developer mode|jailbreak(?:ed)? mode|no (content )?restrictions|without any (restrictions|filters|rules))\b")),
    ("fake_authority", re.compile(r"(?i)\b(safety|content) (mode|filters?|policy) (is|are|has been) (now )?(disabled|off|removed|lifted)\b")),
    ("chat_markup", re.compile(r"<\|im_start\|>\s*system|<\|start_header_id\|>\s*system|\[/?INST\]|</?system>")),
    # "ignore (all) previous instructions" in the languages the encoder does not read
    ("override_multilingual", re.compile(r"(?i)\b(ignore[zs]?|ignora|ignoriere|negeer|zignoruj|abaikan|oublie|olvida|vergiss|dimentica|esque[cç]a)\b[^.\n]{0,30}\b(instructions?|instrucciones|anweisungen|istruzioni|instru[cç][õo]es|instructies|instrukcje|instruksi|consignes|reglas|regeln|regole|regras|r[èe]gles)\b|忽略.{0,10}(指令|提示)|игнорируй.{0,30}инструкци|無視して|무시하고|تجاهل.{0,20}التعليمات|talimatları yok say")),
)  # fmt: skip
_WORD = re.compile(r"\w+", re.UNICODE)
_LEET = str.maketrans({"4": "a", "3": "e", "1": "i", "0": "o", "5": "s", "7": "t", "@": "a", "$": "s"})
_SPACED = re.compile(r"\b(?:\w ){3,}\w\b")  # "i g n o r e"


def normalize(text: str) -> str:
    """Undo the cheap disguises: spaced-out letters, leetspeak inside words, alternating case."""
    text = _SPACED.sub(lambda m: m.group(0).replace(" ", ""), text)
    text = re.sub(r"\b(?=\w*[a-zA-Z])(?=\w*[0-9])[\w]+\b", lambda m: m.group(0).translate(_LEET), text)
    return text.lower()


def windows(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token ranges of ``WINDOW_WORDS``, ``STRIDE_WORDS`` apart, covering every token."""
    if len(tokens) <= WINDOW_WORDS:
        return [(0, len(tokens))] if tokens else []
    starts = list(range(0, len(tokens) - WINDOW_WORDS, STRIDE_WORDS)) + [len(tokens) - WINDOW_WORDS]
    return [(i, i + WINDOW_WORDS) for i in starts]


def tokens(text: str) -> list[str]:
    """The words a window is made of (of normalized text)."""
    return _WORD.findall(text)


def _grams(words: list[str]) -> np.ndarray:
    """Hashed word unigrams and bigrams (crc32: stable across processes, unlike hash())."""
    if not words:
        return np.zeros(0, np.int64)
    grams = [zlib.crc32(w.encode()) for w in words]
    grams += [zlib.crc32(f"{a} {b}".encode()) for a, b in zip(words, words[1:], strict=False)]
    return np.unique(np.asarray(grams, np.int64) % _BUCKETS)


def _features(text: str) -> np.ndarray:
    return _grams(_WORD.findall(text))


def rules(text: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The rules that match normalized ``text``; ``extra``: phrases (normalized) that count as a rule each."""
    hit = tuple(name for name, rule in _RULES if rule.search(text))
    return hit + (("extra_pattern",) if any(p in text for p in extra) else ())


# -- training -------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _fit_sparse(rows: list[np.ndarray], y: np.ndarray, l2: float = 1e-4, steps: int = 400) -> np.ndarray:
    """L2 logistic regression on hashed features (each text's vector of unit length, so a long window and a
    short sentence score alike), full-batch gradient descent with a fixed step."""
    r = np.concatenate([np.full(len(f), i) for i, f in enumerate(rows)]) if rows else np.zeros(0, np.int64)
    c = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    v = np.concatenate([np.full(len(f), 1 / np.sqrt(max(1, len(f)))) for f in rows]) if rows else np.zeros(0)
    w = np.zeros(_BUCKETS + 1)  # the last one is the bias
    n = len(rows)
    pos = y.mean()
    weight = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))  # classes weighed equally
    for _ in range(steps):
        z = np.bincount(r, weights=w[c] * v, minlength=n) + w[-1]
        g = (_sigmoid(z) - y) * weight / n
        grad = np.bincount(c, weights=g[r] * v, minlength=_BUCKETS + 1)
        grad[-1] = g.sum()
        grad[:-1] += l2 * w[:-1]
        w -= 8.0 * grad
    return w


def _fit_dense(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 800) -> np.ndarray:
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x1.shape[1])
    pos = y.mean()
    weight = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    for _ in range(steps):
        g = (_sigmoid(x1 @ w) - y) * weight / len(y)
        grad = x1.T @ g
        grad[:-1] += l2 * w[:-1]
        w -= 2.0 * grad
    return w


def _lex_logit(w: np.ndarray, feats: np.ndarray) -> float:
    return float(w[feats].sum() / np.sqrt(max(1, len(feats))) + w[-1])


@dataclass
class InjectionModel:
    lexical: np.ndarray  # [_BUCKETS + 1]
    embedding: np.ndarray  # [dim + 1]
    stack: np.ndarray  # [3]: a * lexical logit + b * embedding logit + c
    gate: float  # windows the lexical model scores below this skip the encoder
    threshold: float  # the shipped threshold (out-of-fold training scores)
    lexical_only: np.ndarray  # [2]: calibration of a lexical logit alone

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, lexical=self.lexical.astype(np.float32), embedding=self.embedding,
                            stack=self.stack, lexical_only=self.lexical_only,
                            scalars=np.array([self.gate, self.threshold]))  # fmt: skip
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> InjectionModel:
        with np.load(path, allow_pickle=False) as z:
            gate, threshold = (float(v) for v in z["scalars"])
            return cls(z["lexical"].astype(np.float64), z["embedding"], z["stack"], gate, threshold, z["lexical_only"])


@dataclass(frozen=True)
class Example:
    label: int
    kind: str
    group: str
    split: str
    text: str


def load_examples(path: Path | None = None) -> list[Example]:
    if path is None:
        text = (resources.files("agora.router.semantic") / "data" / "injection.tsv").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#") or line.startswith("label\t"):
            continue
        label, kind, group, split, body = line.split("\t", 4)
        out.append(Example(1 if label == "attack" else 0, kind, group, split, body.replace("\\n", "\n")))
    return out


def train(embedder: SentenceEmbedder, examples: list[Example]) -> InjectionModel:
    """The models, the stacker, the gate and the threshold, from the ``train`` split only."""
    data = [e for e in examples if e.split == "train"]
    y = np.array([e.label for e in data], np.float64)
    norm = [normalize(e.text) for e in data]
    words = [tokens(t)[:WINDOW_WORDS] for t in norm]  # what a window holds, as the detector sees it
    feats = [_grams(w) for w in words]
    emb = cached_embeddings(embedder, [" ".join(w) for w in words], "injection-train").astype(np.float64)
    groups = sorted({e.group for e in data})
    fold_of = {g: int(hashlib.sha256(g.encode()).hexdigest(), 16) % _FOLDS for g in groups}
    folds = np.array([fold_of[e.group] for e in data])
    lex_oof, emb_oof = np.zeros(len(data)), np.zeros(len(data))
    for k in range(_FOLDS):
        tr, te = folds != k, folds == k
        wl = _fit_sparse([f for f, t in zip(feats, tr, strict=True) if t], y[tr])
        we = _fit_dense(emb[tr], y[tr])
        lex_oof[te] = [_lex_logit(wl, f) for f, t in zip(feats, te, strict=True) if t]
        emb_oof[te] = np.hstack([emb[te], np.ones((int(te.sum()), 1))]) @ we
    stack = _fit_dense(np.stack([lex_oof, emb_oof], 1) / 10.0, y, l2=0.0, steps=3000)
    stack = np.array([stack[0] / 10.0, stack[1] / 10.0, stack[2]])
    lexical_only = _fit_dense(lex_oof[:, None] / 10.0, y, l2=0.0, steps=3000)
    lexical_only = np.array([lexical_only[0] / 10.0, lexical_only[1]])
    p_lex = _sigmoid(lexical_only[0] * lex_oof + lexical_only[1])
    # the gate: the encoder reads a window only when the lexical score says it might be an attack; at most
    # one benign text in ten (out of fold) gets that far, and any attack the lexical model rates above its
    # lowest one percent does
    gate = max(float(np.quantile(p_lex[y == 1], 0.01)), float(np.quantile(p_lex[y == 0], 0.90)))
    rule_hits = np.array([bool(rules(t)) for t in norm])
    p_stack = _sigmoid(stack[0] * lex_oof + stack[1] * emb_oof + stack[2])
    oof = np.where(rule_hits, 1.0, np.where(p_lex >= gate, p_stack, p_lex))
    # the shipped threshold: the lowest at which at most _MAX_FALSE_POSITIVES of the benign texts score as high
    benign = np.sort(oof[y == 0])[::-1]
    allowed = int(np.floor(_MAX_FALSE_POSITIVES * len(benign)))
    threshold = float(np.nextafter(benign[allowed], np.inf)) if allowed < len(benign) else 0.5
    return InjectionModel(_fit_sparse(feats, y), _fit_dense(emb, y), stack, gate, round(threshold, 4), lexical_only)


MODEL_FILE = "injection_model.npz"


def load_model() -> InjectionModel:
    """The committed model (``benchmarks/semantic/make_injection_set.py --train`` wrote it from the data)."""
    with resources.as_file(resources.files("agora.router.semantic") / "data" / MODEL_FILE) as path:
        return InjectionModel.load(path)


# -- scoring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowScore:
    score: float
    rules: tuple[str, ...]
    start_word: int
    embedded: bool


class InjectionDetector:
    """``scan(texts)`` -> the highest-scoring window of each text, within a bounded encoder budget."""

    def __init__(self, embedder: SentenceEmbedder, model: InjectionModel | None = None, max_embedded: int = 4,
                 extra_patterns: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.embedder = embedder
        self.model = model or load_model()
        self.max_embedded = max_embedded
        self.extra = tuple(normalize(p) for p in extra_patterns if p.strip())
        self._seen: OrderedDict[bytes, WindowScore] = OrderedDict()  # text -> score: agents resend their history
        self._lock = threading.Lock()  # scans run in worker threads
        self.windows_scanned = 0

    @property
    def threshold(self) -> float:
        return self.model.threshold

    def _calibrated(self, logit: float) -> float:
        a, b = self.model.lexical_only
        return float(_sigmoid(np.array(a * logit + b)))

    def scan(self, texts: list[str]) -> list[WindowScore]:
        """One score per text: its highest window's.

        Every window gets the lexical score; those at or above the gate, the likeliest first and at most
        ``max_embedded`` per call, get the stacked score instead. A window past that budget keeps its
        lexical score (at or above the gate, so it is never silently cleared)."""
        m = self.model
        out: dict[int, WindowScore] = {}
        scored: dict[int, list[list]] = {}  # text index -> [[start, score, lexical logit, words, embedded]]
        digests = [_digest(text) for text in texts]  # once each: a tool result may be a megabyte
        for i, text in enumerate(texts):
            with self._lock:
                known = self._seen.get(digests[i])
            if known is not None:
                out[i] = known
                continue
            norm = normalize(text)
            hit = rules(norm, self.extra)
            if hit:
                out[i] = WindowScore(1.0, hit, 0, False)
                continue
            words = tokens(norm)
            rows = []
            for a, b in windows(words):
                logit = _lex_logit(m.lexical, _grams(words[a:b]))
                rows.append([a, self._calibrated(logit), logit, words[a:b], False])
            scored[i] = rows
        candidates = sorted((row for rows in scored.values() for row in rows if row[1] >= m.gate),
                            key=lambda row: -row[1])[: self.max_embedded]  # fmt: skip
        if candidates:
            vectors = self.embedder.embed([" ".join(row[3]) for row in candidates]).astype(np.float64)
            e_logits = np.hstack([vectors, np.ones((len(candidates), 1))]) @ m.embedding
            for row, e in zip(candidates, e_logits, strict=True):
                row[1] = float(_sigmoid(np.array(m.stack[0] * row[2] + m.stack[1] * e + m.stack[2])))
                row[4] = True
        self.windows_scanned = sum(len(rows) for rows in scored.values())
        for i, rows in scored.items():
            best = max(rows, key=lambda row: row[1], default=None)
            out[i] = WindowScore(best[1], (), best[0], best[4]) if best is not None else WindowScore(0.0, (), 0, False)
            if all(row[4] or row[1] < m.gate for row in rows):  # decided for good: remember it
                self._remember(digests[i], out[i])
        for i, score in out.items():
            if i not in scored:
                self._remember(digests[i], score)
        return [out[i] for i in range(len(texts))]

    def _remember(self, digest: bytes, score: WindowScore) -> None:
        with self._lock:
            self._seen[digest] = score
            self._seen.move_to_end(digest)
            while len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).digest()
