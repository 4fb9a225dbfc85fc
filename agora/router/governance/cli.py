"""``agora keys``, ``agora tenants``, ``agora usage``, ``agora audit``: the governance store from a shell.

Each works on the store directly (``--db``, default: the SQLite file under the cache
folder, the one ``agora route`` uses); gateways sharing the store see a change within a
second. ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from agora.router.governance import audit, service
from agora.router.governance.store import BANDS, ROLES, Store, StoreError

_DB_HELP = "governance store: sqlite:///path or postgresql://... (default: governance.db in the agora cache folder)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, help=_DB_HELP)
    common.add_argument("--json", action="store_true", help="print JSON")

    keys = sub.add_parser("keys", help="create, list and revoke virtual API keys")
    ks = keys.add_subparsers(dest="action", required=True)
    c = ks.add_parser("create", parents=[common], help="make a key (printed once, stored only as a hash)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--role", choices=ROLES, default="user")
    _limit_flags(c)
    c.add_argument("--models", default=None, help="comma-separated model names or globs this key may use")
    c.add_argument("--expires", default=None, metavar="DURATION", help="e.g. 30d, 12h")
    c.add_argument("--priority", choices=BANDS, default="interactive",
                   help="the key's band, and the highest it may ask for with x-agora-priority")  # fmt: skip
    ls = ks.add_parser("list", parents=[common], help="list keys (ids, never the keys)")
    ls.add_argument("--tenant", default=None)
    ls.add_argument("--all", action="store_true", help="revoked keys too")
    rv = ks.add_parser("revoke", parents=[common], help="revoke a key by id")
    rv.add_argument("id")

    tenants = sub.add_parser("tenants", help="tenant weights (fair queueing) and limits")
    ts = tenants.add_subparsers(dest="action", required=True)
    st = ts.add_parser("set", parents=[common], help="create or change a tenant")
    st.add_argument("name")
    st.add_argument("--weight", type=float, default=None, help="share of the fair queue (default 1)")
    _limit_flags(st)
    ts.add_parser("list", parents=[common], help="list tenants")

    us = sub.add_parser("usage", parents=[common], help="requests, tokens, blocked and budget left per tenant")
    us.add_argument("--tenant", default=None)

    au = sub.add_parser("audit", help="verify or export the audit chain")
    aus = au.add_subparsers(dest="action", required=True)
    aus.add_parser("verify", parents=[common], help="check that no record was changed or deleted")
    ex = aus.add_parser("export", parents=[common], help="write records as JSON lines")
    ex.add_argument("--since", default=None, help="ISO time, a duration back (1h, 7d) or epoch seconds")
    ex.add_argument("--until", default=None)
    ex.add_argument("--tenant", default=None)
    ex.add_argument("--out", default="-", help="file to write (default: standard output)")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, default=None, help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, help="tokens (in + out) per minute")
    p.add_argument("--max-parallel", type=int, default=None, help="requests in flight at once")
    p.add_argument("--budget-tokens", type=int, default=None, help="tokens per budget window")
    p.add_argument("--budget-window", default=None, metavar="DURATION", help="1h, 1d, 30d (with --budget-tokens)")
    p.add_argument("--session-requests", type=int, default=None, help="requests per x-session-id")
    p.add_argument("--session-tokens", type=int, default=None, help="tokens per x-session-id")


def main(args: argparse.Namespace) -> int:
    try:
        store = Store(args.db)
    except StoreError as exc:
        print(f"agora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, store)
    except ValueError as exc:
        print(f"agora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _run(args: argparse.Namespace, store: Store) -> int:
    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "keys" and action == "create":
        values = {k: getattr(args, k) for k in service.KEY_FIELDS if getattr(args, k, None) is not None}
        made = service.new_key(store, values)
        if args.json:
            _print_json(made)
        else:
            print(made["key"])
            print(f"id {made['id']}, tenant {made['tenant']}, role {made['role']}: keep the key now, it is not "
                  "shown again", file=sys.stderr)  # fmt: skip
        return 0
    if cmd == "keys" and action == "list":
        keys = [k.public() for k in store.keys(args.tenant, include_revoked=args.all)]
        if args.json:
            _print_json(keys)
        else:
            _table(["id", "tenant", "role", "priority", "models", "limits", "expires", "state"],
                   [[k["id"], k["tenant"], k["role"], k["priority"], ",".join(k["models"] or ["*"]),
                     _limits_text(k["limits"]), _when(k["expires"]), "revoked" if k["revoked"] else "live"]
                    for k in keys])  # fmt: skip
        return 0
    if cmd == "keys" and action == "revoke":
        ok = store.revoke_key(args.id)
        if args.json:
            _print_json({"id": args.id, "revoked": ok})
        elif ok:
            print(f"revoked {args.id}")
        else:
            print(f"agora keys revoke: no live key {args.id!r}", file=sys.stderr)
        return 0 if ok else 1
    if cmd == "tenants" and action == "set":
        values = {k: getattr(args, k) for k in service.TENANT_FIELDS if getattr(args, k, None) is not None}
        t = service.set_tenant(store, args.name, values)
        _print_json(t) if args.json else print(f"tenant {t['name']}: weight {t['weight']:g}, "
                                               f"{_limits_text(t['limits'])}")  # fmt: skip
        return 0
    if cmd == "tenants" and action == "list":
        rows = [service.tenant_dict(t) for t in store.tenants()]
        if args.json:
            _print_json(rows)
        else:
            _table(["tenant", "weight", "limits"], [[t["name"], f"{t['weight']:g}", _limits_text(t["limits"])]
                                                    for t in rows])  # fmt: skip
        return 0
    if cmd == "usage":
        rows = service.usage(store, args.tenant)
        if args.json:
            _print_json(rows)
        else:
            _table(["tenant", "requests", "tokens in", "tokens out", "blocked", "budget left"],
                   [[r["tenant"], r["requests"], r["tokens_in"], r["tokens_out"], r["blocked"],
                     "-" if r["budget_left"] is None else r["budget_left"]] for r in rows])  # fmt: skip
        return 0
    if cmd == "audit" and action == "verify":
        verdict = audit.verify(store)
        if args.json:
            _print_json(verdict.as_dict())
        elif verdict.ok:
            print(f"audit chain intact: {verdict.records} records")
        else:
            print(f"audit chain BROKEN at record {verdict.first_bad_seq}: {verdict.problem}")
        return 0 if verdict.ok else 1
    if cmd == "audit" and action == "export":
        since, until = service.parse_time(args.since), service.parse_time(args.until, "until")
        out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
        n = 0
        try:
            for record in audit.records(store, since, until, args.tenant):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{n} records", file=sys.stderr)
        return 0
    raise ValueError(f"unknown command {cmd} {action or ''}")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _limits_text(limits: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in limits.items()) or "no limits"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
