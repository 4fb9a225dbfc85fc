"""The audit: one append-only record per request, chained by hashes.

A record says who (tenant, key id, never the key), what (API, model asked for and
served, endpoint, routing and semantic decision), how it went (status, tokens in and
out, TTFT, latency, the block or limit reason, what the guards flagged or quarantined, and
where) and, only with
``audit.include_content: true``, the prompt and the completion.

Each stored record carries ``prev_hash`` and ``hash = sha256(prev_hash + canonical JSON of
the record, its sequence number included)``; the store keeps the head (last sequence
number and hash) in its own row. An edited record no longer hashes to its ``hash``; a
deleted one leaves a gap in the sequence or breaks the next record's ``prev_hash``; a
truncated tail no longer reaches the head. :func:`verify` finds the first of these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agora.router.governance.store import Store, canonical


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    return hashlib.sha256((prev + canonical(record)).encode()).hexdigest()


@dataclass
class Verdict:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad_seq": self.first_bad_seq, "problem": self.problem}


def verify(store: Store, page: int = 2000) -> Verdict:
    """Walk the whole chain from the first record to the head."""
    prev, expected, count, after = "", 1, 0, 0
    while True:
        rows = store.audit_page(after=after, limit=page)
        if not rows:
            break
        for seq, text, prev_hash, digest in rows:
            if seq != expected:
                return Verdict(False, count, expected, f"record {expected} is missing (next is {seq})")
            if prev_hash != prev:
                return Verdict(False, count, seq, f"record {seq} does not follow record {seq - 1}")
            try:
                record = json.loads(text)
            except ValueError:
                return Verdict(False, count, seq, f"record {seq} is not JSON")
            if record.get("seq") != seq or chain_hash(prev, record) != digest:
                return Verdict(False, count, seq, f"record {seq} was changed after it was written")
            prev, expected, count, after = digest, seq + 1, count + 1, seq
    head_seq, head_hash = store.audit_head()
    if head_seq != count or head_hash != prev:
        return Verdict(False, count, count + 1, f"the chain ends at record {count}, the head says {head_seq}")
    return Verdict(True, count)


def records(store: Store, since: float | None = None, until: float | None = None,
            tenant: str | None = None, page: int = 1000) -> Iterator[dict[str, Any]]:  # fmt: skip
    after = 0
    while True:
        rows = store.audit_page(after=after, limit=page, since=since, until=until, tenant=tenant)
        if not rows:
            return
        for seq, text, _, digest in rows:
            yield {**json.loads(text), "hash": digest}
            after = seq


def new_record(**fields: Any) -> dict[str, Any]:
    """A record with every field present (None where unknown), so the JSON shape never varies."""
    base = dict.fromkeys(FIELDS)
    base.update(fields)
    return base


FIELDS = ("time", "request_id", "tenant", "key_id", "session", "api", "path", "model_requested", "model_served",
          "endpoint", "routing", "semantic_decision", "priority", "status", "tokens_in", "tokens_out", "ttft_ms",
          "latency_ms", "queue_ms", "reason", "flags")  # fmt: skip
