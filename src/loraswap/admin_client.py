"""``loraswap tenants`` and ``loraswap usage``: thin clients of a running server's admin API
(like ``loraswap adapters``), so a change lands in the shared document at once, no restart."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def add_connection_args(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--url", default=default_url, help="server URL (default: %(default)s)")
    parser.add_argument(
        "--key",
        default=os.environ.get("LORASWAP_ADMIN_API_KEY") or os.environ.get("LORASWAP_API_KEY"),
        help="admin key (default: $LORASWAP_ADMIN_API_KEY, else $LORASWAP_API_KEY)",
    )


def call(ns: argparse.Namespace, method: str, path: str, body: Any = None) -> Any | None:
    """The response's JSON, or None after printing the error (OpenAI error shape)."""
    import httpx

    headers = {"Authorization": f"Bearer {ns.key}"} if getattr(ns, "key", None) else {}
    try:
        resp = httpx.request(method, ns.url.rstrip("/") + path, json=body, headers=headers,
                             timeout=600)  # fmt: skip
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {ns.url}: {exc}", file=sys.stderr)
        return None
    try:
        payload = resp.json()
    except ValueError:
        payload = resp.text
    if resp.status_code >= 400:
        message = payload["error"]["message"] if isinstance(payload, dict) else payload
        print(f"error ({resp.status_code}): {message}", file=sys.stderr)
        return None
    return payload


def _limits(ns: argparse.Namespace) -> dict[str, int] | None:
    names = ("max_concurrent", "requests_per_minute", "tokens_per_minute",
             "batch_tokens_per_day", "max_pins")  # fmt: skip
    given = {n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None}
    return given or None


def cmd_tenants(ns: argparse.Namespace) -> int:
    name = getattr(ns, "name", None)
    if ns.action == "list":
        payload = call(ns, "GET", "/admin/tenants")
    elif ns.action == "show":
        payload = call(ns, "GET", f"/admin/tenants/{name}")
    elif ns.action == "add":
        body = {"name": name, "adapters": ns.adapters, "base_model": not ns.no_base_model}
        if (limits := _limits(ns)) is not None:
            body["limits"] = limits
        if ns.sources is not None:
            body["sources"] = ns.sources
        payload = call(ns, "POST", "/admin/tenants", body)
    elif ns.action == "set":
        body = {"adapters": ns.adapters, "limits": _limits(ns)}
        if ns.base_model is not None:
            body["base_model"] = ns.base_model == "yes"
        if ns.sources is not None or ns.default_sources:
            body["sources"] = ns.sources
        payload = call(ns, "PATCH", f"/admin/tenants/{name}", body)
    elif ns.action == "remove":
        payload = call(ns, "DELETE", f"/admin/tenants/{name}")
    elif ns.action == "add-key":
        payload = call(ns, "POST", f"/admin/tenants/{name}/keys",
                       {"role": ns.role, "label": ns.label})  # fmt: skip
        if payload is not None:
            print(f"key {payload['id']} ({payload['role']}) for {name}; shown once, keep it:",
                  file=sys.stderr)  # fmt: skip
            print(payload["key"])
            return 0
    else:  # revoke-key
        payload = call(ns, "DELETE", f"/admin/tenants/{name}/keys/{ns.key_id}")
    if payload is None:
        return 1
    print(json.dumps(payload, indent=2))
    return 0


def cmd_usage(ns: argparse.Namespace) -> int:
    query = "&".join(f"{k}={v}" for k, v in (("tenant", ns.tenant), ("since", ns.since)) if v)
    payload = call(ns, "GET", "/admin/usage" + (f"?{query}" if query else ""))
    if payload is None:
        return 1
    if ns.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"{'DAY':10} {'TENANT':16} {'MODEL':32} {'SOURCE':6} {'REQ':>6} {'PROMPT':>9} "
          f"{'COMPLETION':>10}")  # fmt: skip
    for r in payload["data"]:
        counts = f"{r['requests']:>6} {r['prompt_tokens']:>9} {r['completion_tokens']:>10}"
        print(f"{r['day']:10} {r['tenant']:16} {r['model']:32} {r['source']:6} {counts}")
    return 0


def cmd_comparisons(ns: argparse.Namespace) -> int:
    query = f"?adapter={ns.adapter}" if ns.adapter else ""
    payload = call(ns, "GET", "/admin/comparisons" + query)
    if payload is None:
        return 1
    if ns.json:
        print(json.dumps(payload, indent=2))
        return 0
    if not payload["data"]:
        print("no comparisons yet: set a shadow (loraswap adapters shadow NAME VERSION)")
    for pair in payload["data"]:
        print(
            f"{pair['adapter']}: {pair['primary_version']} vs shadow {pair['shadow_version']}: "
            f"{pair['count']} requests, {pair['identical']} identical "
            f"({pair['identical_share']:.0%}), {pair['shadow_errors']} shadow errors"
        )
        print(
            f"  tokens (mean) {pair['mean_primary_tokens']} vs {pair['mean_shadow_tokens']}; "
            f"latency p50 {pair['primary_latency_p50_s']} s vs {pair['shadow_latency_p50_s']} s"
        )
        for sample in pair["samples"][: ns.samples]:
            print(f"  #{sample['id']} prompt: {sample['prompt'][:200]!r}")
            print(f"    {pair['primary_version']}: {sample['primary_text'][:200]!r}")
            print(f"    {pair['shadow_version']}: {(sample['shadow_text'] or '')[:200]!r}")
    return 0  # fmt: skip


def cmd_audit(ns: argparse.Namespace) -> int:
    query = f"?limit={ns.limit}" + (f"&adapter={ns.adapter}" if ns.adapter else "")
    payload = call(ns, "GET", "/admin/audit" + query)
    if payload is None:
        return 1
    if ns.json:
        print(json.dumps(payload, indent=2))
        return 0
    for e in payload["data"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        who = e["actor"] + (f" ({e['key_id']})" if e["key_id"] else "")
        print(f"{when}  {who:20} {e['action']:9} {e['adapter']:24} {json.dumps(e['detail'])}")
    return 0


def add_parsers(sub: Any, default_url: str) -> None:
    ten = sub.add_parser("tenants", help="tenants, their adapters, limits and keys")
    add_connection_args(ten, default_url)
    acts = ten.add_subparsers(dest="action", required=True)
    acts.add_parser("list")
    acts.add_parser("show").add_argument("name")
    add = acts.add_parser("add", help="a tenant owning adapters by name or `prefix*`")
    setter = acts.add_parser(
        "set", help="change a tenant's adapters, sources, base access or limits"
    )
    for parser in (add, setter):
        parser.add_argument("name")
        parser.add_argument("--adapters", nargs="*", help="names or prefixes (`acme-*`)")
        parser.add_argument(
            "--sources",
            nargs="*",
            help="where its admin keys may register "
            "adapters from (`roots`, `adapters/acme`, `s3://bucket/acme/`...)",
        )
        for flag in ("max-concurrent", "requests-per-minute", "tokens-per-minute",
                     "batch-tokens-per-day", "max-pins"):  # fmt: skip
            parser.add_argument(f"--{flag}", type=int)
    add.set_defaults(adapters=[])
    add.add_argument("--no-base-model", action="store_true", help="may not use the base model")
    setter.add_argument("--base-model", choices=["yes", "no"])
    setter.add_argument(
        "--default-sources", action="store_true", help="back to the policy's tenant_default"
    )
    acts.add_parser("remove").add_argument("name")
    key = acts.add_parser("add-key", help="a new key, printed once")
    key.add_argument("name")
    key.add_argument("--role", choices=["user", "admin"], default="user")
    key.add_argument("--label", default="")
    rev = acts.add_parser("revoke-key", help="revoke a key by its id")
    rev.add_argument("name")
    rev.add_argument("key_id")
    ten.set_defaults(func=cmd_tenants)

    use = sub.add_parser("usage", help="requests and tokens per tenant, model and day")
    add_connection_args(use, default_url)
    use.add_argument("--tenant")
    use.add_argument("--since", help="first day, YYYY-MM-DD")
    use.add_argument("--json", action="store_true")
    use.set_defaults(func=cmd_usage)

    cmp_ = sub.add_parser("comparisons", help="shadow versions' answers next to their alias's")
    add_connection_args(cmp_, default_url)
    cmp_.add_argument("--adapter")
    cmp_.add_argument("--samples", type=int, default=3, help="differing pairs shown per pair")
    cmp_.add_argument("--json", action="store_true")
    cmp_.set_defaults(func=cmd_comparisons)

    aud = sub.add_parser("audit", help="adapter registry changes: who, when, what")
    add_connection_args(aud, default_url)
    aud.add_argument("--adapter")
    aud.add_argument("--limit", type=int, default=50)
    aud.add_argument("--json", action="store_true")
    aud.set_defaults(func=cmd_audit)
