"""Where governance state lives: tenants, keys, budget usage and the audit chain.

One small SQL schema, two databases:

- ``sqlite:///path`` (the default, ``$AGORA_CACHE_DIR/governance.db``): WAL mode and a busy
  timeout, so several gateway processes on one machine share it;
- ``postgresql://...`` (psycopg 3, ``pip install agora[postgres]``): several gateways on
  several machines share it.

Every statement is written once in the SQL both accept (``ON CONFLICT`` upserts, ``?``
placeholders turned into ``%s`` for psycopg). Writers take the database's own lock
(``BEGIN IMMEDIATE`` on SQLite, a row lock on PostgreSQL), so two processes appending to
the audit chain or migrating at once stay consistent. Migrations are numbered and run
in order inside one transaction; ``agora_meta.schema_version`` says where a database is.

Secrets never reach this module: a key is stored as its SHA-256 (keys are 256 random
bits, so a plain hash cannot be reversed by search).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from agora import envs
from agora.openai.common import PRIORITY_BANDS

ROLES = ("admin", "user")
BANDS = PRIORITY_BANDS  # dispatch order; sheddable is refused first when saturated
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel", "budget_tokens", "budget_window_s", "session_requests",
                "session_tokens")  # fmt: skip

# Each migration: (version, statements). Never edit a released one; add the next.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE tenants (name TEXT PRIMARY KEY, weight DOUBLE PRECISION NOT NULL, limits TEXT NOT NULL,"
        " created DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants (name),"
        " key_hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL, limits TEXT NOT NULL, models TEXT,"
        " priority TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION,"
        " revoked DOUBLE PRECISION)",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant)",
        "CREATE TABLE usage_windows (subject TEXT NOT NULL, window_start BIGINT NOT NULL,"
        " tokens BIGINT NOT NULL, PRIMARY KEY (subject, window_start))",
        "CREATE TABLE audit (seq BIGINT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, tenant TEXT, key_id TEXT,"
        " status INTEGER NOT NULL, tokens_in BIGINT NOT NULL, tokens_out BIGINT NOT NULL,"
        " blocked INTEGER NOT NULL, record TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        "CREATE INDEX audit_ts ON audit (ts)",
        "CREATE INDEX audit_tenant ON audit (tenant, ts)",
        "CREATE TABLE audit_head (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL)",
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '')",
    ]),
]  # fmt: skip
SCHEMA_VERSION = MIGRATIONS[-1][0]


class StoreError(RuntimeError):
    """The database cannot be used: bad URL, missing driver, newer schema than this agora knows."""


@dataclass(frozen=True)
class Limits:
    """Limits of a key or a tenant; None is no limit."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (in + out) per minute
    max_parallel: int | None = None  # requests in flight at once
    budget_tokens: int | None = None  # tokens per budget window
    budget_window_s: int | None = None  # fixed windows aligned to the epoch (1d resets at 00:00 UTC)
    session_requests: int | None = None  # per x-session-id: a runaway agent run stops, its tenant does not
    session_tokens: int | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Limits:
        data = json.loads(text or "{}")
        return cls(**{k: int(v) for k, v in data.items() if k in LIMIT_FIELDS and v is not None})

    def merged(self, **changes: int | None) -> Limits:
        return Limits(**{**self.__dict__, **{k: v for k, v in changes.items() if k in LIMIT_FIELDS}})


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    limits: Limits = field(default_factory=Limits)
    created: float = 0.0


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    key_hash: str
    role: str
    limits: Limits
    models: tuple[str, ...] | None  # allow-list (names or globs); None = every model
    priority: str  # the highest band the key may use, and its default
    created: float
    expires: float | None
    revoked: float | None

    def public(self) -> dict[str, Any]:
        """What listings show: never the key, never its hash."""
        return {"id": self.id, "tenant": self.tenant, "role": self.role, "priority": self.priority,
                "models": list(self.models) if self.models is not None else None,
                "limits": json.loads(self.limits.to_json()), "created": self.created, "expires": self.expires,
                "revoked": self.revoked}  # fmt: skip


class Store:
    """A governance database. Thread-safe: one connection behind a lock (the gateway calls it from
    worker threads, never from its event loop)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        self._lock = threading.RLock()
        parsed = urlparse(self.url)
        if parsed.scheme == "sqlite":
            path = unquote(parsed.path)
            if parsed.netloc:  # sqlite://relative/path
                path = parsed.netloc + path
            if not path or path == "/":
                raise StoreError(f"--db {self.url!r}: give a file, e.g. sqlite:///var/lib/agora/governance.db")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.kind = "sqlite"
            self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self.where = path
        elif parsed.scheme in ("postgresql", "postgres"):
            try:
                import psycopg
            except ImportError:
                raise StoreError("a postgresql:// store needs psycopg: pip install 'agora[postgres]'") from None
            self.kind = "postgresql"
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to the PostgreSQL store: {_first_line(exc)}") from None
            self.where = f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}{parsed.path}"
        else:
            raise StoreError(f"--db {self.url!r}: the URL must start with sqlite:/// or postgresql://")
        self.migrate()

    # -- plumbing ----------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    @contextmanager
    def tx(self) -> Iterator[Any]:
        """A write transaction holding the database's write lock (SQLite) or ready for row locks (PostgreSQL)."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if self.kind == "sqlite" else "BEGIN")
            try:
                yield _Cursor(cur, self)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), tuple(params))
                return list(cur.fetchall())
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def migrate(self) -> None:
        with self.tx() as cur:
            if self.kind == "postgresql":  # one migrator at a time across machines
                cur.execute("SELECT pg_advisory_xact_lock(4242)")
            cur.execute("CREATE TABLE IF NOT EXISTS agora_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            cur.execute("SELECT value FROM agora_meta WHERE name = 'schema_version'")
            row = cur.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"the store {self.where} has schema version {version}; this agora knows up to "
                                 f"{SCHEMA_VERSION}: upgrade agora")  # fmt: skip
            for number, statements in MIGRATIONS:
                if number <= version:
                    continue
                for statement in statements:
                    cur.execute(statement)
                version = number
            cur.execute("INSERT INTO agora_meta (name, value) VALUES ('schema_version', ?) ON CONFLICT (name) "
                        "DO UPDATE SET value = excluded.value", (str(version),))  # fmt: skip
            cur.execute("INSERT INTO agora_meta (name, value) VALUES ('keys_version', '0') ON CONFLICT (name) "
                        "DO NOTHING")  # fmt: skip

    def schema_version(self) -> int:
        return int(self.query("SELECT value FROM agora_meta WHERE name = 'schema_version'")[0][0])

    # -- tenants and keys ------------------------------------------------------------------

    def keys_version(self) -> int:
        """Bumped by every change to tenants or keys: gateways poll it and reload when it moves."""
        return int(self.query("SELECT value FROM agora_meta WHERE name = 'keys_version'")[0][0])

    @staticmethod
    def _bump(cur: Any) -> None:
        cur.execute("UPDATE agora_meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
                    "WHERE name = 'keys_version'")  # fmt: skip

    def ensure_tenant(self, cur: Any, name: str) -> None:
        cur.execute("INSERT INTO tenants (name, weight, limits, created) VALUES (?, 1.0, '{}', ?) "
                    "ON CONFLICT (name) DO NOTHING", (name, time.time()))  # fmt: skip

    def set_tenant(self, name: str, weight: float | None = None, **limits: int | None) -> Tenant:
        with self.tx() as cur:
            self.ensure_tenant(cur, name)
            cur.execute("SELECT weight, limits, created FROM tenants WHERE name = ?", (name,))
            w, text, created = cur.fetchone()
            merged = Limits.from_json(text).merged(**limits)
            weight = float(w) if weight is None else float(weight)
            cur.execute("UPDATE tenants SET weight = ?, limits = ? WHERE name = ?", (weight, merged.to_json(), name))
            self._bump(cur)
        return Tenant(name, weight, merged, created)

    def tenants(self) -> list[Tenant]:
        rows = self.query("SELECT name, weight, limits, created FROM tenants ORDER BY name")
        return [Tenant(n, float(w), Limits.from_json(limits), float(c)) for n, w, limits, c in rows]

    def create_key(self, key_id: str, key_hash: str, tenant: str, role: str, limits: Limits,
                   models: Sequence[str] | None, priority: str, expires: float | None) -> KeyRecord:  # fmt: skip
        now = time.time()
        with self.tx() as cur:
            self.ensure_tenant(cur, tenant)
            cur.execute("INSERT INTO api_keys (id, tenant, key_hash, role, limits, models, priority, created, "
                        "expires, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        (key_id, tenant, key_hash, role, limits.to_json(),
                         json.dumps(list(models)) if models is not None else None, priority, now, expires))  # fmt: skip
            self._bump(cur)
        return KeyRecord(key_id, tenant, key_hash, role, limits, tuple(models) if models is not None else None,
                         priority, now, expires, None)  # fmt: skip

    def revoke_key(self, key_id: str) -> bool:
        with self.tx() as cur:
            cur.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id))
            changed = cur.rowcount > 0
            if changed:
                self._bump(cur)
        return changed

    def keys(self, tenant: str | None = None, include_revoked: bool = True) -> list[KeyRecord]:
        sql = "SELECT id, tenant, key_hash, role, limits, models, priority, created, expires, revoked FROM api_keys"
        where, params = [], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if not include_revoked:
            where.append("revoked IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.query(sql + " ORDER BY created, id", params)
        return [KeyRecord(r[0], r[1], r[2], r[3], Limits.from_json(r[4]),
                          tuple(json.loads(r[5])) if r[5] is not None else None, r[6], float(r[7]),
                          None if r[8] is None else float(r[8]), None if r[9] is None else float(r[9]))
                for r in rows]  # fmt: skip

    # -- budget usage --------------------------------------------------------------------

    def add_usage(self, amounts: dict[tuple[str, int], int]) -> None:
        """Add tokens to (subject, window start) counters, all in one transaction."""
        self.flush([], amounts, None)

    def flush(self, records: Sequence[dict[str, Any]], amounts: dict[tuple[str, int], int], chain: Any) -> None:
        """Audit records and usage counts in one transaction: a failed flush leaves neither, so
        the caller may retry it whole without writing a record twice."""
        if not records and not amounts:
            return
        with self.tx() as cur:
            if records:
                self._append_audit(cur, records, chain)
            for (subject, start), tokens in sorted(amounts.items()):
                cur.execute("INSERT INTO usage_windows (subject, window_start, tokens) VALUES (?, ?, ?) "
                            "ON CONFLICT (subject, window_start) DO UPDATE SET tokens = usage_windows.tokens + "
                            "excluded.tokens", (subject, start, tokens))  # fmt: skip

    def usage_of(self, windows: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The tokens counted so far in each (subject, window start)."""
        out: dict[tuple[str, int], int] = {}
        subjects = sorted({s for s, _ in windows})
        for i in range(0, len(subjects), 200):
            part = subjects[i : i + 200]
            rows = self.query(f"SELECT subject, window_start, tokens FROM usage_windows WHERE subject IN "
                              f"({', '.join('?' * len(part))})", part)  # fmt: skip
            wanted = set(windows)
            out.update({(s, int(w)): int(t) for s, w, t in rows if (s, int(w)) in wanted})
        return out

    # -- audit ---------------------------------------------------------------------------

    def append_audit(self, records: Sequence[dict[str, Any]], chain: Any) -> None:
        """Append records to the hash chain (``chain(prev_hash, record) -> hash``), atomically."""
        self.flush(records, {}, chain)

    def _append_audit(self, cur: Any, records: Sequence[dict[str, Any]], chain: Any) -> None:
        cur.execute("SELECT seq, hash FROM audit_head WHERE id = 1" + (" FOR UPDATE" if self.kind ==
                    "postgresql" else ""))  # fmt: skip
        seq, prev = cur.fetchone()
        seq = int(seq)
        for record in records:
            seq += 1
            record = {**record, "seq": seq}
            digest = chain(prev, record)
            cur.execute("INSERT INTO audit (seq, ts, tenant, key_id, status, tokens_in, tokens_out, blocked, "
                        "record, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, record["time"], record.get("tenant"), record.get("key_id"), record["status"],
                         record.get("tokens_in", 0), record.get("tokens_out", 0),
                         1 if record.get("reason") else 0, canonical(record), prev, digest))  # fmt: skip
            prev = digest
        cur.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))

    def audit_page(self, after: int = 0, limit: int = 100, since: float | None = None, until: float | None = None,
                   tenant: str | None = None) -> list[tuple[int, str, str, str]]:  # fmt: skip
        """(seq, record JSON, prev_hash, hash) in order, after ``after``."""
        where, params = _audit_filter(since, until, tenant)
        sql = f"SELECT seq, record, prev_hash, hash FROM audit WHERE seq > ?{where} ORDER BY seq LIMIT ?"
        return [(int(s), r, p, h) for s, r, p, h in self.query(sql, [after, *params, limit])]

    def audit_head(self) -> tuple[int, str]:
        seq, digest = self.query("SELECT seq, hash FROM audit_head WHERE id = 1")[0]
        return int(seq), digest

    def usage_report(self, tenant: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Per tenant: requests, tokens in and out, blocked (from the audit records)."""
        sql = ("SELECT tenant, COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), "
               "COALESCE(SUM(blocked), 0) FROM audit WHERE tenant IS NOT NULL")  # fmt: skip
        where, params = _audit_filter(since, None, tenant)
        rows = self.query(sql + where + " GROUP BY tenant ORDER BY tenant", params)
        return [{"tenant": t, "requests": int(n), "tokens_in": int(i), "tokens_out": int(o), "blocked": int(b)}
                for t, n, i, o, b in rows]  # fmt: skip


def _audit_filter(since: float | None, until: float | None, tenant: str | None) -> tuple[str, list[Any]]:
    """`` AND ...`` conditions on the audit table (placeholders only: values never enter the SQL)."""
    parts = [(" AND ts >= ?", since), (" AND ts < ?", until), (" AND tenant = ?", tenant)]
    kept = [(sql, value) for sql, value in parts if value is not None]
    return "".join(sql for sql, _ in kept), [value for _, value in kept]


class _Cursor:
    """A cursor that speaks ``?`` placeholders on both databases."""

    def __init__(self, cur: Any, store: Store) -> None:
        self._cur, self._store = cur, store

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self._store._sql(sql), tuple(params))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def default_url() -> str:
    return f"sqlite:///{envs.cache_dir() / 'governance.db'}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
