"""Plot a many-adapters result: throughput and TTFT p99 per system, adapter count and traffic.

    python benchmarks/many_report.py [benchmarks/results/many-<time>.json]

Writes docs/many-adapters-<cpu kind>.png (the newest result when no path is given) and prints
the table that docs/benchmarks.md keeps. Needs matplotlib (`requirements/bench.txt`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def rows(data: dict) -> list[tuple[str, str, dict]]:
    """(system/N, traffic, figures) for the one-adapter run and each Zipf alpha."""
    out = []
    for run, figures in data["runs"].items():
        out.append((run, "one adapter", figures["one_adapter"]))
        for alpha, zipf in figures["zipf"].items():
            out.append((run, f"Zipf {alpha}", zipf))
        if "one_adapter_after" in figures:  # results before 2026-11-28 have no second run
            out.append((run, "one adapter, after", figures["one_adapter_after"]))
    return out


def table(data: dict) -> str:
    lines = [
        "| system / adapters | traffic | tok/s | ÷ one adapter (first / mean of both) "
        "| TTFT p50 / p99 s | errors | isolation |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, traffic, f in rows(data):
        iso = f.get("isolation")
        same = f"{iso['identical']}/{iso['checked']}" if iso else "—"
        ratio = f"{f['vs_one_adapter']:.2f}x" if "vs_one_adapter" in f else "—"
        if "vs_one_adapter_mean" in f:
            ratio += f" / {f['vs_one_adapter_mean']:.2f}x"
        lines.append(
            f"| {run} | {traffic} | {f['tok_per_s']:.0f} | {ratio} | "
            f"{f['ttft_p50_s']:.2f} / {f['ttft_p99_s']:.2f} | {f['errors']} | {same} |"
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = rows(data)
    labels = [f"{run}\n{traffic}" for run, traffic, _ in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = ["tab:blue" if "one" in t else "tab:orange" for _, t, _ in entries]
    ax1.bar(range(len(entries)), [f["tok_per_s"] for _, _, f in entries], color=colours)
    ax2.bar(range(len(entries)), [f["ttft_p99_s"] for _, _, f in entries], color=colours)
    for ax, title in ((ax1, "output tokens/s (higher is better)"), (ax2, "TTFT p99 s")):
        ax.set_xticks(range(len(entries)), labels, fontsize=6, rotation=60, ha="right")
        ax.set_title(title)
    ax2.axhline(1.5, color="grey", linestyle="--", linewidth=0.8)
    cpu = data["cpu"]
    fig.suptitle(
        f"{data['args']['streams']} streams, {cpu['kind']} ({cpu['cores']} cores), "
        f"slots {data['slots'].get('max_loras')}, {data['started']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else max(RESULTS.glob("many-*.json"))
    data = json.loads(path.read_text())
    out = ROOT / "docs" / f"many-adapters-{data['cpu']['kind']}.png"
    plot(data, out)
    print(table(data))
    print(f"\nplot: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
