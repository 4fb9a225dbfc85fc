"""The governance store on both databases (SQLite, and a real throwaway PostgreSQL), the audit
chain's tamper detection, the limiter and the fair queue, without a gateway."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from agora.openai.errors import APIError
from agora.router.governance import audit, service
from agora.router.governance.fairness import FairQueue
from agora.router.governance.keys import create_key, hash_key
from agora.router.governance.limits import Limiter, LimitError, Subject, Window
from agora.router.governance.store import SCHEMA_VERSION, Limits, Store, StoreError
from tests.router.postgres import Postgres, Unavailable

_names = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres()
    try:
        pg.start()
    except Unavailable as exc:
        pg.stop()
        pytest.skip(f"no PostgreSQL here: {exc}")
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gov.db'}"
    return request.getfixturevalue("postgres").database(f"t{next(_names)}_{int(time.time() * 1000) % 10**8}")


def test_migrations_are_versioned_and_idempotent(db_url) -> None:
    store = Store(db_url)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    again = Store(db_url)  # a second open (another gateway) migrates nothing
    assert again.schema_version() == SCHEMA_VERSION
    again.close()


def test_keys_are_hashed_listed_and_revoked(db_url) -> None:
    store = Store(db_url)
    v0 = store.keys_version()
    key, record = create_key(store, "team-a", "user", Limits(rpm=5), ["m", "claude-*"], "batch", "30d")
    assert key.startswith("agk-") and len(key) > 40
    assert record.key_hash == hash_key(key) and key not in record.key_hash
    assert store.keys_version() > v0
    [listed] = store.keys()
    assert listed.id == record.id and listed.limits.rpm == 5 and listed.models == ("m", "claude-*")
    assert listed.expires is not None and listed.expires > time.time() + 29 * 86400
    public = listed.public()
    assert key not in str(public) and record.key_hash not in str(public)
    assert store.revoke_key(record.id) and not store.revoke_key(record.id)
    assert store.keys(include_revoked=False) == []
    store.close()


def test_names_with_sql_metacharacters_are_refused_or_kept_verbatim(db_url) -> None:
    store = Store(db_url)
    for bad in ("a'; DROP TABLE api_keys; --", "x\x00y", "", "a" * 200, "robert'); --"):
        with pytest.raises(ValueError):
            service.new_key(store, {"tenant": bad})
    with pytest.raises(ValueError):
        service.set_tenant(store, "t'--", {"weight": 2})
    # model names are data, never SQL
    made = service.new_key(store, {"tenant": "ok", "models": ["m'; DELETE FROM tenants; --"]})
    assert store.keys()[0].models == ("m'; DELETE FROM tenants; --",)
    assert [t.name for t in store.tenants()] == ["ok"] and made["id"]
    store.close()


def test_usage_windows_add_up_across_two_processes_worth_of_writes(db_url) -> None:
    a, b = Store(db_url), Store(db_url)
    a.add_usage({("key:k", 3600): 10})
    b.add_usage({("key:k", 3600): 5, ("tenant:t", 3600): 7})
    assert a.usage_of([("key:k", 3600), ("tenant:t", 3600), ("key:none", 3600)]) == {
        ("key:k", 3600): 15, ("tenant:t", 3600): 7}  # fmt: skip
    a.close()
    b.close()


def _records(n: int, tenant: str = "t") -> list[dict]:
    return [audit.new_record(time=time.time(), tenant=tenant, key_id="key_1", status=200, tokens_in=3, tokens_out=4)
            for _ in range(n)]  # fmt: skip


def test_audit_chain_verifies_and_concurrent_writers_keep_it_whole(db_url) -> None:
    stores = [Store(db_url) for _ in range(3)]

    def write(s: Store) -> None:
        for _ in range(10):
            s.append_audit(_records(3), audit.chain_hash)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdict = audit.verify(stores[0])
    assert verdict.ok and verdict.records == 90, verdict
    report = stores[0].usage_report()
    assert report == [{"tenant": "t", "requests": 90, "tokens_in": 270, "tokens_out": 360, "blocked": 0}]
    for s in stores:
        s.close()


def _tamper(url: str, sql: str) -> None:
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)


@pytest.mark.parametrize("attack,problem", [
    ("UPDATE audit SET record = replace(record, '\"tokens_out\":4', '\"tokens_out\":0') WHERE seq = 3", "changed"),
    ("DELETE FROM audit WHERE seq = 2", "missing"),
    ("DELETE FROM audit WHERE seq = 5", "head"),
])  # fmt: skip
def test_audit_tampering_is_found(db_url, attack, problem) -> None:
    store = Store(db_url)
    store.append_audit(_records(5), audit.chain_hash)
    assert audit.verify(store).ok
    _tamper(db_url, attack)
    verdict = audit.verify(store)
    assert not verdict.ok and problem in verdict.problem, verdict
    store.close()


def test_cli_keys_usage_and_audit(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'gov.db'}"

    def agora(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agora.cli", *args, "--db", db], capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    made = agora("keys", "create", "--tenant", "acme", "--rpm", "10", "--budget-tokens", "1000", "--budget-window",
                 "1d", "--models", "m,n", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    import json

    key = json.loads(made.stdout)
    assert key["key"].startswith("agk-") and key["limits"] == {"rpm": 10, "budget_tokens": 1000,
                                                               "budget_window_s": 86400}  # fmt: skip
    plain = agora("keys", "create", "--tenant", "acme")
    assert plain.stdout.strip().startswith("agk-") and "not shown again" in plain.stderr
    listed = agora("keys", "list")
    assert key["id"] in listed.stdout and key["key"] not in listed.stdout
    assert agora("keys", "revoke", key["id"]).returncode == 0
    assert agora("keys", "revoke", key["id"]).returncode == 1
    assert (
        agora("tenants", "set", "acme", "--weight", "3", "--budget-tokens", "50", "--budget-window", "1h").returncode
        == 0
    )
    usage = json.loads(agora("usage", "--json").stdout)
    assert usage[0]["tenant"] == "acme" and usage[0]["budget_left"] == 50
    assert "acme" in agora("usage").stdout
    assert "intact: 0 records" in agora("audit", "verify").stdout
    bad = agora("keys", "create", "--tenant", "acme", "--budget-tokens", "5")
    assert bad.returncode == 2 and "together" in bad.stderr
    wrong = subprocess.run([sys.executable, "-m", "agora.cli", "usage", "--db", "mysql://x"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 2 and "sqlite:///" in wrong.stderr


def test_store_url_errors_are_clear(tmp_path) -> None:
    with pytest.raises(StoreError, match="sqlite:///"):
        Store("redis://x")
    with pytest.raises(StoreError, match="PostgreSQL"):
        Store("postgresql://nobody@127.0.0.1:1/none")


# -- limiter -----------------------------------------------------------------------------------


def test_window_slides_and_says_when_to_retry() -> None:
    w = Window()
    w.add(1000.2, 3)
    w.add(1030.5, 2)
    assert w.total(1030.9) == 5
    assert w.retry_after(1030.9, 5) == 30  # the first bucket leaves the minute at 1060
    assert w.total(1060.0) == 2


def test_budget_reservations_bound_the_overshoot_of_parallel_requests() -> None:
    lim = Limiter()
    subject = Subject("key:k", "key k", Limits(budget_tokens=200, budget_window_s=86400))
    held, refused = [], 0
    for _ in range(100):  # 100 requests in flight at once: 20 tokens of input, max_tokens 10
        try:
            held.append(lim.admit([subject], 30, tokens_in=20))
        except LimitError as exc:
            assert exc.code == "insufficient_quota" and exc.status == 429
            refused += 1
    for r in held:
        r.settle(30)  # each used all it reserved
    used = lim.budgets.used(("key:k", int(time.time() // 86400) * 86400))
    assert refused == 100 - len(held) and 170 < used <= 200 + 10, (used, len(held))
    with pytest.raises(LimitError):
        lim.admit([subject], 30, tokens_in=20)


def test_rpm_parallel_and_session_limits() -> None:
    lim = Limiter()
    s = Subject("tenant:t", "tenant 't'", Limits(rpm=2, max_parallel=1))
    r = lim.admit([s], 1)
    with pytest.raises(LimitError) as exc:
        lim.admit([s], 1)
    assert exc.value.limit == "max_parallel"
    r.settle(1)
    lim.admit([s], 1).settle(1)
    with pytest.raises(LimitError) as exc:
        lim.admit([s], 1)
    assert exc.value.limit == "rpm" and exc.value.code == "rate_limit_exceeded" and exc.value.headers["Retry-After"]
    caps = Limits(session_requests=2)
    for _ in range(2):
        lim.admit([], 1, ("t", "run-1"), caps).settle(1)
    with pytest.raises(LimitError) as exc:
        lim.admit([], 1, ("t", "run-1"), caps)
    assert exc.value.limit == "session_requests"
    lim.admit([], 1, ("t", "run-2"), caps)  # another run of the same tenant goes on


# -- fair queue --------------------------------------------------------------------------------


async def test_fair_queue_orders_by_band_then_weighted_tenants() -> None:
    weights = {"a": 1.0, "b": 2.0}
    q = FairQueue(lambda m: 1, slots_per_endpoint=1, max_queue=100, max_wait_s=5, weight=lambda t: weights.get(t, 1))
    first = await q.acquire("m", "a", "batch")
    order: list[str] = []

    async def one(tenant: str, band: str, tag: str) -> None:
        slot = await q.acquire("m", tenant, band)
        order.append(tag)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.create_task(one("a", "batch", f"a{i}")) for i in range(4)]
    tasks += [asyncio.create_task(one("b", "batch", f"b{i}")) for i in range(4)]
    tasks.append(asyncio.create_task(one("c", "interactive", "c0")))
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as shed:
        await q.acquire("m", "d", "sheddable")
    assert shed.value.status == 503 and shed.value.code == "shed"
    first.release()
    await asyncio.gather(*tasks)
    assert order[0] == "c0"  # interactive first
    rest = order[1:]
    assert sorted(rest) == sorted(f"{t}{i}" for t in "ab" for i in range(4))
    # weight 2 for b: in the first six dispatches b has twice a's turns
    head = rest[:6]
    assert head.count("b0") + head.count("b1") + head.count("b2") + head.count("b3") == 4, rest


async def test_fair_queue_bounds_waits_and_forgets_cancelled_clients() -> None:
    q = FairQueue(lambda m: 1, slots_per_endpoint=1, max_queue=1, max_wait_s=0.2)
    held = await q.acquire("m", "a", "interactive")
    waiter = asyncio.create_task(q.acquire("m", "b", "interactive"))
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as full:
        await q.acquire("m", "c", "interactive")
    assert full.value.status == 429 and full.value.code == "gateway_saturated"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.waiting() == 0
    with pytest.raises(APIError) as late:
        await q.acquire("m", "d", "interactive")
    assert late.value.status == 503 and late.value.code == "queue_timeout"
    held.release()
    (await q.acquire("m", "e", "interactive")).release()


async def test_a_gateway_that_starts_knows_an_exhausted_budget_at_its_first_request(tmp_path) -> None:
    from agora.router.governance.limits import key_subject, window_of
    from agora.router.governance.runtime import Governance

    url = f"sqlite:///{tmp_path / 'gov.db'}"
    store = Store(url)
    key, record = create_key(store, "acme", limits=Limits(budget_tokens=100, budget_window_s=3600))
    window = window_of(record.limits, key_subject(record.id), time.time())
    store.add_usage({window: 100})  # spent through another gateway
    store.close()
    gov = Governance(url, None)
    await gov.start()
    try:
        ident = gov.identify(f"Bearer {key}", "c")
        with pytest.raises(LimitError) as exc:
            gov.limiter.admit(ident.subjects(), 10)
        assert exc.value.limit == "budget"
        # settled tokens still count while they are being flushed, and after
        gov.limiter.budgets.pending[window] = 5
        flushing = gov.limiter.budgets.take_pending()
        assert flushing == {window: 5} and gov.limiter.budgets.used(window) == 105
        gov.limiter.budgets.flush_failed()
        await gov.sync()
        assert gov.limiter.budgets.used(window) == 105 and gov.limiter.budgets.pending == {}
    finally:
        await gov.stop()


def test_a_failed_flush_writes_neither_records_nor_usage(db_url) -> None:
    store = Store(db_url)
    broken = [*_records(2), {"status": 200}]  # the third has no time: the insert fails halfway
    with pytest.raises(KeyError):
        store.flush(broken, {("key:k", 0): 9}, audit.chain_hash)
    assert store.audit_head() == (0, "") and store.usage_of([("key:k", 0)]) == {}
    store.flush(_records(2), {("key:k", 0): 9}, audit.chain_hash)  # the retry, whole
    assert audit.verify(store).records == 2 and store.usage_of([("key:k", 0)]) == {("key:k", 0): 9}
    store.close()
