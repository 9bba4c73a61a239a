"""The CLI's management commands: login, customers, keys, versions, aliases, rollback, logs, status.

Each is a thin call of the management API (``lukewarm.client``) printed for a person: a table or the
JSON answer; a refused call is one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from lukewarm import config
from lukewarm.client import Client, LukewarmError

DEFAULT_URL = "http://127.0.0.1:8080"
FOLLOW_INTERVAL_S = 2.0


def url_of(args: argparse.Namespace) -> str:
    return config.setting("url", getattr(args, "url", ""), ("LUKEWARM_URL",), DEFAULT_URL)


def token_of(args: argparse.Namespace) -> str:
    return config.setting("token", getattr(args, "token", ""), ("LUKEWARM_TOKEN", "LUKEWARM_ADMIN_TOKEN"))


def customer_of(args: argparse.Namespace) -> str:
    return config.setting("customer", getattr(args, "customer", ""), ("LUKEWARM_CUSTOMER",), "demo")


def api(args: argparse.Namespace) -> Client:
    try:
        return Client(url_of(args), token_of(args), customer=customer_of(args))
    except ValueError as exc:
        raise SystemExit(f"lukewarm: {exc}") from None


def q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def branch_path(args: argparse.Namespace) -> str:
    return (f"/api/v1/customers/{q(customer_of(args))}/models/{q(args.model)}/branches/"
            f"{q(args.branch.replace('/', '~'))}")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The answer, or exit with the refusal as one line."""
    try:
        return api(args).request(method, path, body)
    except LukewarmError as exc:
        raise SystemExit(f"lukewarm {args.command}: {exc}") from None


def show(value: Any) -> int:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells) + "\n"


# ---- commands ----------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    """Check the credentials against the ingress, then save them (0600) for every later command."""
    url, token, customer = url_of(args), token_of(args), customer_of(args)
    if not token:
        raise SystemExit("lukewarm login: give --token (the admin token or a deploy key)")
    probe = Client(url, token, customer=customer)
    try:
        probe.request("GET", f"/api/v1/customers/{q(customer)}/keys")
    except LukewarmError as exc:
        raise SystemExit(f"lukewarm login: {exc}") from None
    saved = config.save({"url": url, "token": token, "customer": customer, "key": args.key})
    sys.stdout.write(f"logged in to {url} as customer {customer}; saved in {saved}\n")
    return 0


def cmd_customer_create(args: argparse.Namespace) -> int:
    return show(call(args, "PUT", f"/api/v1/customers/{q(args.name)}"))


def cmd_keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"scopes": args.scope or ["predict"]}
    if args.expires_in_s:
        body["expires_in_s"] = args.expires_in_s
    return show(call(args, "POST", f"/api/v1/customers/{q(customer_of(args))}/keys", body))


def cmd_keys_list(args: argparse.Namespace) -> int:
    answer = call(args, "GET", f"/api/v1/customers/{q(customer_of(args))}/keys")
    sys.stdout.write(table(["KEY ID"], [[k] for k in answer.get("keys", [])]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/api/v1/customers/{q(customer_of(args))}/keys/{q(args.key_id)}")
    sys.stdout.write(f"revoked {args.key_id}\n")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    answer = call(args, "GET", f"{branch_path(args)}/versions")
    named: dict[int, list[str]] = {}
    for pointer, number in (answer.get("pointers") or {}).items():
        named.setdefault(int(number), []).append(pointer)
    rows = [[n, ", ".join(sorted(named.get(n, [])))] for n in answer.get("versions", [])]
    sys.stdout.write(table(["VERSION", "POINTERS"], rows))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    if args.retire:
        return show(call(args, "DELETE", f"{branch_path(args)}/versions/{args.number}"))
    return show(call(args, "GET", f"{branch_path(args)}/versions/{args.number}"))


def cmd_alias(args: argparse.Namespace) -> int:
    path = f"{branch_path(args)}/aliases/{q(args.alias)}"
    if args.delete:
        call(args, "DELETE", path)
        sys.stdout.write(f"alias {args.alias} deleted\n")
        return 0
    if args.version is None:
        raise SystemExit("lukewarm alias: give the version the alias names (or --delete)")
    return show(call(args, "PUT", path, {"version": args.version}))


def cmd_rollback(args: argparse.Namespace) -> int:
    return show(call(args, "POST", f"{branch_path(args)}/rollback", {"version": args.to} if args.to else {}))


def log_line(entry: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("ts") or 0)))
    parts = [when, f"v{entry.get('version')}", str(entry.get("request_id", "")), str(entry.get("status", ""))]
    if entry.get("error"):
        parts.append(f"error: {entry['error']}")
    text = " ".join(p for p in parts if p)
    for stream in ("stdout", "stderr"):
        for line in str(entry.get(stream) or "").splitlines():
            text += f"\n    {stream}: {line}"
    return text


def cmd_logs(args: argparse.Namespace, clock: Callable[[], float] = time.monotonic,
             pause: Callable[[float], None] = time.sleep) -> int:
    """Recent requests of a branch, oldest first; ``--follow`` polls for new ones until Ctrl-C."""
    seen: set[tuple[Any, Any]] = set()
    path = f"{branch_path(args)}/logs?limit={args.limit}"
    while True:
        answer = call(args, "GET", path)
        for entry in reversed(answer.get("logs", [])):
            mark = (entry.get("request_id"), entry.get("ts"))
            if mark not in seen:
                seen.add(mark)
                sys.stdout.write(log_line(entry) + "\n")
        sys.stdout.flush()
        if not args.follow:
            return 0
        if len(seen) > 100_000:  # a week of following: forget the oldest marks, not the process
            seen.clear()
        try:
            pause(FOLLOW_INTERVAL_S)  # the polling interval of --follow
        except KeyboardInterrupt:
            return 0


def cmd_status(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/api/v1/status")
    if args.json:
        return show(answer)
    now = float(answer.get("ts") or time.time())
    rows = []
    for proxy in answer.get("proxies", []):
        states: dict[str, int] = {}
        for replica in proxy.get("replicas", []):
            states[str(replica.get("state"))] = states.get(str(replica.get("state")), 0) + 1
        rows.append([proxy.get("proxy_id"), proxy.get("url"), f"{now - float(proxy.get('ts') or now):.1f}s",
                     ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "-",
                     ", ".join(sorted({str(r.get('version')) for r in proxy.get("replicas", [])})) or "-"])
    sys.stdout.write(table(["PROXY", "URL", "HEARTBEAT", "REPLICAS", "VERSIONS"], rows))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser, model_args: argparse.ArgumentParser) -> None:
    """The management commands on the CLI's subparsers; ``common`` adds --url/--token/--customer."""
    login = sub.add_parser("login", parents=[common], help="check and save the URL and credentials")
    login.add_argument("--key", default="", help="a predict key to save too (for `lukewarm call`)")
    login.set_defaults(fn=cmd_login)

    customers = sub.add_parser("customers", help="customers (admin token)").add_subparsers(dest="sub", required=True)
    create = customers.add_parser("create", parents=[common], help="create a customer (idempotent)")
    create.add_argument("name")
    create.set_defaults(fn=cmd_customer_create)

    keys = sub.add_parser("keys", help="API keys of a customer").add_subparsers(dest="sub", required=True)
    made = keys.add_parser("create", parents=[common], help="create a key; printed once")
    made.add_argument("--scope", action="append", choices=["predict", "deploy"], help="repeat for both")
    made.add_argument("--expires-in-s", type=int, default=0)
    made.set_defaults(fn=cmd_keys_create)
    keys.add_parser("list", parents=[common], help="the customer's key ids").set_defaults(fn=cmd_keys_list)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(fn=cmd_keys_revoke)

    versions = sub.add_parser("versions", parents=[common, model_args], help="a model's versions and pointers")
    versions.set_defaults(fn=cmd_versions)

    version = sub.add_parser("version", parents=[common, model_args], help="show (or --retire) one version")
    version.add_argument("number", type=int)
    version.add_argument("--retire", action="store_true", help="retire it (its replicas go once idle)")
    version.set_defaults(fn=cmd_version)

    alias = sub.add_parser("alias", parents=[common, model_args], help="point an alias at a version")
    alias.add_argument("alias")
    alias.add_argument("version", type=int, nargs="?")
    alias.add_argument("--delete", action="store_true")
    alias.set_defaults(fn=cmd_alias)

    rollback = sub.add_parser("rollback", parents=[common, model_args], help="move latest back")
    rollback.add_argument("--to", type=int, default=0, help="the version (default: the one before latest)")
    rollback.set_defaults(fn=cmd_rollback)

    logs = sub.add_parser("logs", parents=[common, model_args], help="recent requests with their output")
    logs.add_argument("--limit", type=int, default=50)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new ones (Ctrl-C stops)")
    logs.set_defaults(fn=cmd_logs)

    status = sub.add_parser("status", parents=[common], help="the fleet: proxies, replicas, heartbeats")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)
