"""Stored responses of the Responses API, in SQLite (the embedded default).

One file under the cache folder, in WAL mode, so the replicas of ``agora serve --replicas``
(processes on one machine) share it: a ``previous_response_id`` chain works whichever replica
serves its next turn. Each response is kept with the input items it was asked with and the
owner that stored it (a hash of the API key, or "" without keys): another owner gets a 404.
Entries expire after ``ttl_s``; beyond ``max_responses`` the oldest go first.

::

    responses(id, owner, created, previous, input JSON, response JSON)   -- schema version 1
    chain(id): walk previous ids back, then replay input + output items oldest first
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MAX_CHAIN = 1000  # previous_response_id links followed at most


class ResponseStore:
    def __init__(self, path: str | Path, ttl_s: float, max_responses: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s, self.max_responses = ttl_s, max_responses
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                                 "created REAL NOT NULL, previous TEXT, input TEXT NOT NULL, response TEXT NOT NULL)")  # fmt: skip
                self._db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created)")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]], owner: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM responses WHERE created < ?", (now - self.ttl_s,))
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                                 (response["id"], owner, now, response.get("previous_response_id"),
                                  json.dumps(input_items), json.dumps(response)))  # fmt: skip
                over = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] - self.max_responses
                if over > 0:
                    self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created "
                                     "LIMIT ?)", (over,))  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, response_id: str, owner: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(response, its input items), or None: unknown, expired, or another owner's."""
        with self._lock:
            row = self._db.execute("SELECT response, input, created FROM responses WHERE id = ? AND owner = ?",
                                   (response_id, owner)).fetchone()  # fmt: skip
        if row is None or row[2] < time.time() - self.ttl_s:
            return None
        return json.loads(row[0]), json.loads(row[1])

    def delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cur.rowcount > 0

    def chain(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including ``response_id``, as input items (None if a link is missing)."""
        links: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        current: str | None = response_id
        while current is not None and len(links) < MAX_CHAIN:
            found = self.get(current, owner)
            if found is None:
                return None
            links.append(found)
            current = found[0].get("previous_response_id")
        items: list[dict[str, Any]] = []
        for response, inputs in reversed(links):
            items += inputs
            items += [replayed(item) for item in response.get("output", [])]
        return items


def replayed(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item that sends it back."""
    if item.get("type") == "message":
        parts = [{"type": "output_text", "text": p.get("text", "")} for p in item.get("content", [])]
        return {"type": "message", "role": "assistant", "content": parts, "id": item.get("id")}
    if item.get("type") == "reasoning":  # its text, for templates that write a turn's thinking back
        return {k: item[k] for k in ("type", "id", "summary", "content") if k in item}
    return {k: item[k] for k in ("type", "id", "call_id", "name", "arguments") if k in item}
