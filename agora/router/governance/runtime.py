"""What a running gateway holds of governance: the live keys, the limiter, the audit queue.

The store is read and written only from worker threads, in one sync pass about every
``sync_interval_s``: flush the audit records and settled budget tokens of this process,
read the keys' version (and reload tenants and keys when it moved: a revoked key stops
working within one pass on every gateway sharing the store), read back the budget
counts. Checking a key on the request path is a hash and a dict lookup.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agora.openai.errors import APIError, bearer_token_matches
from agora.router.governance.audit import chain_hash
from agora.router.governance.keys import hash_key
from agora.router.governance.limits import Limiter, Subject, key_subject, tenant_subject, window_of
from agora.router.governance.store import BANDS, KeyRecord, Limits, Store, Tenant

logger = logging.getLogger(__name__)

_MAX_CLIENTS = 10_000  # client addresses tracked for failed keys


@dataclass(frozen=True)
class Identity:
    """Who is asking. ``tenant`` is None on an open gateway (no keys configured)."""

    tenant: str | None
    key_id: str | None
    role: str
    scope: str  # what isolates caches: the tenant's hash (or, open, the credential's)
    owner: str  # whose stored responses: the key's hash
    key: KeyRecord | None = None
    tenant_record: Tenant | None = None

    def subjects(self) -> list[Subject]:
        out = []
        if self.key is not None and self.key.limits != Limits():
            out.append(Subject(key_subject(self.key.id), f"key {self.key.id}", self.key.limits))
        t = self.tenant_record
        if t is not None and t.limits != Limits():
            out.append(Subject(tenant_subject(t.name), f"tenant {t.name!r}", t.limits))
        return out

    def session_limits(self, defaults: Limits) -> Limits:
        own = self.key.limits if self.key is not None else Limits()
        return Limits(session_requests=own.session_requests or defaults.session_requests,
                      session_tokens=own.session_tokens or defaults.session_tokens)  # fmt: skip

    def may_use(self, model: str | None) -> bool:
        allowed = self.key.models if self.key is not None else None
        if allowed is None or model is None:
            return True
        return any(model == m or fnmatch.fnmatchcase(model, m) for m in allowed)

    def band(self, asked: str | None) -> str:
        """The priority band: the key's own, or a lower one the client asks for (403 for a higher one)."""
        top = self.key.priority if self.key is not None else "interactive"
        if asked is None or asked == "":
            return top
        if asked not in BANDS:
            raise APIError(400, f"x-agora-priority {asked!r}: one of {', '.join(BANDS)}", param="x-agora-priority")
        if BANDS.index(asked) < BANDS.index(top):
            raise APIError(403, f"this key may not use the {asked} band (its highest is {top})", "permission_error",
                           code="priority_not_allowed")  # fmt: skip
        return asked


class Governance:
    def __init__(self, store_url: str | None, static_key: str | None, sync_interval_s: float = 0.5,
                 auth_failures_per_minute: int = 20, session_defaults: Limits | None = None) -> None:  # fmt: skip
        self.store_url, self.static_key = store_url, static_key
        self.sync_interval = sync_interval_s
        self.failure_cap = auth_failures_per_minute
        self.session_defaults = session_defaults or Limits()
        self.store: Store | None = None
        self.by_hash: dict[str, KeyRecord] = {}
        self.tenants: dict[str, Tenant] = {}
        self.version = -1
        self.limiter = Limiter()
        self.audit_queue: list[dict[str, Any]] = []
        self.failures: OrderedDict[str, list[float]] = OrderedDict()  # client -> times of failed keys
        self._task: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.store = await asyncio.to_thread(Store, self.store_url)
        await self.sync()
        self._task = asyncio.create_task(self._loop())
        logger.info("governance store %s: %d keys, %d tenants", self.store.kind, len(self.by_hash), len(self.tenants))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.sync()  # the last audit records and usage
        finally:
            if self.store is not None:
                await asyncio.to_thread(self.store.close)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - a store that is down for a moment: keep serving, retry
                logger.exception("governance sync failed; retrying")

    async def sync(self) -> None:
        """One pass: flush, reload keys if they changed, read back budgets. Serialized."""
        if self.store is None:
            return
        async with self._sync_lock:
            records, self.audit_queue = self.audit_queue, []
            budgets = self.limiter.budgets
            pending = budgets.take_pending()
            known = (list(self.by_hash.values()), list(self.tenants.values()), list(budgets.reserved))
            try:
                version, keys, tenants, counts = await asyncio.to_thread(self._sync_io, records, pending, *known)
            except BaseException:
                self.audit_queue[:0] = records  # put them back: nothing is lost on a failed pass
                budgets.flush_failed()
                raise
            if keys is not None:
                self.by_hash = {k.key_hash: k for k in keys if k.revoked is None}
                self.tenants = {t.name: t for t in tenants}
                self.version = version
            budgets.refreshed(counts)

    def _sync_io(self, records: list[dict[str, Any]], pending: dict, keys: list[KeyRecord], tenants: list[Tenant],
                 reserved: list[tuple[str, int]]) -> tuple:  # fmt: skip
        store = self.store
        assert store is not None
        store.flush(records, pending, chain_hash)  # both or neither: a failed pass is retried whole
        version = store.keys_version()
        fresh = fresh_tenants = None
        if version != self.version:
            fresh, fresh_tenants = store.keys(include_revoked=False), store.tenants()
        # The current window of every budget, read before any request needs it (a gateway that just
        # started knows an exhausted budget from its first request), and any window still reserved.
        now = time.time()
        asked = set(reserved)
        for k in fresh if fresh is not None else keys:
            asked.add(window_of(k.limits, key_subject(k.id), now))
        for t in fresh_tenants if fresh_tenants is not None else tenants:
            asked.add(window_of(t.limits, tenant_subject(t.name), now))
        asked.discard(None)
        counts = store.usage_of(sorted(asked)) if asked else {}  # type: ignore[arg-type]
        return version, fresh, fresh_tenants, counts

    # -- identity ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """No key anywhere: the gateway serves anyone, as without governance."""
        return self.static_key is None and not self.by_hash

    def identify(self, credential: str, client: str) -> Identity:
        """The caller of a request, or a 401."""
        token = credential[7:] if credential.lower().startswith("bearer ") else ""
        if self.static_key is not None and bearer_token_matches(credential, self.static_key):
            return Identity("default", "static", "admin", _scope("tenant:default"), _scope("key:static"),
                            tenant_record=self.tenants.get("default"))  # fmt: skip
        record = self.by_hash.get(hash_key(token)) if token else None
        if record is not None:
            if record.expires is not None and record.expires <= time.time():
                raise APIError(401, f"the API key {record.id} has expired", "authentication_error",
                               code="expired_api_key")  # fmt: skip
            return Identity(record.tenant, record.id, record.role, _scope(f"tenant:{record.tenant}"),
                            _scope(f"key:{record.id}"), record, self.tenants.get(record.tenant))  # fmt: skip
        if self.open:
            scope = hashlib.sha256(credential.encode("latin-1", "replace")).hexdigest()
            return Identity(None, None, "admin", scope, scope)
        raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def throttled(self, client: str) -> APIError | None:
        """A client that sent too many wrong keys in the last minute: refused before any check."""
        times = self.failures.get(client)
        if not times:
            return None
        now = time.monotonic()
        while times and times[0] <= now - 60:
            times.pop(0)
        if len(times) < self.failure_cap:
            return None
        wait = max(1, int(times[0] + 60 - now) + 1)
        return APIError(429, "too many requests with an invalid API key from this client", "rate_limit_error",
                        code="too_many_auth_failures", headers={"Retry-After": str(wait)})  # fmt: skip

    def failed(self, client: str) -> None:
        """Count a wrong key from ``client``."""
        times = self.failures.get(client)
        if times is None:
            times = self.failures[client] = []
            while len(self.failures) > _MAX_CLIENTS:
                self.failures.popitem(last=False)
        self.failures.move_to_end(client)
        times.append(time.monotonic())
        del times[: -self.failure_cap - 1]

    def weight(self, scope_or_tenant: str) -> float:
        t = self.tenants.get(scope_or_tenant)
        return t.weight if t is not None else 1.0

    def record(self, record: dict[str, Any]) -> None:
        if self.store is not None:
            self.audit_queue.append(record)


def is_loopback(client: str) -> bool:
    """A client address on this machine."""
    return client in ("127.0.0.1", "::1", "localhost") or client.startswith("127.")


def _scope(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
