"""Turn a ``bench.py`` result into the generated part of ``docs/benchmarks.md`` and a PNG plot.

    python benchmarks/report.py [benchmarks/results/bench-....json]   (default: the newest)

Only the text between the ``bench:start`` / ``bench:end`` markers is rewritten; the analysis
around it is written by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
LABELS = {
    "loraswap": "loraswap (OpenAI route)",
    "loraswap-eager": "loraswap, eager (LORASWAP_COMPILE_LORA=false)",
    "loraswap-compiled": "loraswap, compiled with LoRA on (results before it was the default)",
    "loraswap-w8a8": "loraswap, W8A8 INT8 weights",
    "vllm": "plain vLLM, same args (LoRA on)",
    "vllm-nolora": "plain vLLM, LoRA off",
    "vllm-eager": "plain vLLM, LoRA off, no torch.compile",
    "hf": "hand-rolled FastAPI + transformers + peft",
    "llamacpp": "llama.cpp server (Q4_1 GGUF)",
}


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


class Result:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.runs = {(r["system"], r["scenario"], r["concurrency"]): r for r in data["runs"]}

    def get(self, system: str, concurrency: int, key: str, scenario: str = "base") -> float | None:
        run = self.runs.get((system, scenario, concurrency))
        return None if run is None else run.get(key)

    def systems(self) -> list[str]:
        seen = {r["system"] for r in self.data["runs"]}
        return [s for s in LABELS if s in seen]

    def concurrencies(self) -> list[int]:
        return sorted({r["concurrency"] for r in self.data["runs"] if r["scenario"] == "base"})


def tables(res: Result, plot_name: str) -> str:
    d = res.data
    m, w = d["machine"], d["workload"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    out = [
        f"Run {d['started']} at commit `{m['git']}` on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; {vers}. Workload: random {w['input_tokens']}-token prompts, "
        f"{w['output_tokens']} output tokens (EOS ignored), greedy, driven by "
        f"{w['load_generator']}; engine settings {json.dumps(d['settings'])}.",
        "",
        "| system | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
        "| ok/failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system in res.systems():
        for c in res.concurrencies():
            run = res.runs.get((system, "base", c))
            if run is None:
                continue
            out.append(
                f"| {LABELS[system]} | {c} | {fmt(run['output_throughput'], 1)} | "
                f"{fmt(run['median_ttft_ms'])} | {fmt(run['p99_ttft_ms'])} | "
                f"{fmt(run['median_tpot_ms'], 1)} | {run['completed']}/{run['failed'] or 0} |"
            )
    out += [
        "",
        "Ratios (loraswap ÷ other, same run; throughput above 1 and TTFT below 1 favour loraswap):",
        "",
        "| concurrency | tok/s vs vLLM | TTFT p50 vs vLLM | tok/s vs vLLM LoRA off | "
        "tok/s vs hand-rolled | tok/s vs llama.cpp |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in res.concurrencies():
        tput = res.get("loraswap", c, "output_throughput")
        ttft = res.get("loraswap", c, "median_ttft_ms")
        out.append(
            f"| {c} | {ratio(tput, res.get('vllm', c, 'output_throughput'))} | "
            f"{ratio(ttft, res.get('vllm', c, 'median_ttft_ms'))}"
            f" | {ratio(tput, res.get('vllm-nolora', c, 'output_throughput'))} | "
            f"{ratio(tput, res.get('hf', c, 'output_throughput'))} | "
            f"{ratio(tput, res.get('llamacpp', c, 'output_throughput'))} |"
        )
    mixed = [(s, r) for (s, sc, _c), r in res.runs.items() if sc == "mixed"]
    if mixed:
        out += [
            "",
            f"Multi-LoRA: base model + {w['adapters']} adapters, round robin, "
            "against base-only traffic:",
            "",
            "| system | concurrency | mixed tok/s | base-only tok/s (same server) | "
            "mixed ÷ base-only | mixed ÷ vLLM LoRA off | TTFT p50 ms | TPOT p50 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for system, run in mixed:
            c, tput = run["concurrency"], run["output_throughput"]
            base = res.get(system, c, "output_throughput")
            off = res.get("vllm-nolora", c, "output_throughput")
            out.append(
                f"| {LABELS[system]} | {c} | {fmt(tput, 1)} | {fmt(base, 1)} | "
                f"{ratio(tput, base)} | {ratio(tput, off)} | "
                f"{fmt(run['median_ttft_ms'])} | {fmt(run['median_tpot_ms'], 1)} |"
            )
    if jit := d.get("jit"):
        cold = ", ".join(fmt(x) for x in jit["jit_ttft_ms"])
        warm = ", ".join(fmt(x) for x in jit["warm_ttft_ms"])
        out += [
            "",
            f"Just-in-time adapter load under {jit['streams']} concurrent base streams "
            f"({jit['loads']} fresh adapters, each registered then requested):",
            "",
            f"- first request TTFT: {cold} ms; the next request to the same adapter: {warm} ms; "
            f"added by the load (median): **{fmt(jit['jit_added_ms_median'])} ms**",
            f"- base requests: TTFT p50 / p99 {fmt(jit['base_ttft_p50_ms_reference'])} / "
            f"{fmt(jit['base_ttft_p99_ms_reference'])} ms without loads; "
            f"p99 {fmt(jit['base_ttft_p99_ms_during_loads'])} ms (max "
            f"{fmt(jit['base_ttft_max_ms_during_loads'])} ms) over the "
            f"{jit['base_requests_overlapping_loads']} whose first token overlapped a load",
        ]
    if ready := d.get("ready_s"):
        starts = ", ".join(f"{LABELS[s]} {v:.1f} s" for s, v in ready.items() if s in LABELS)
        first = d.get("first_start_s", {}).get("loraswap")
        out += [
            "",
            f"Start to ready (warm caches): {starts}."
            + (f" loraswap's first start in this run: {first:.1f} s." if first else ""),
        ]
    if scores := d.get("quality"):
        reference = scores.get("loraswap")
        out += [
            "",
            "Quality (greedy answers to 16 fixed chat prompts compared exactly with the bf16 "
            "model's; perplexity on a fixed passage):",
            "",
            "| model | perplexity | answers identical to bf16 |",
            "| --- | ---: | ---: |",
        ]
        for system, score in scores.items():
            same = "n/a"
            if reference:
                pairs = zip(score["answers"], reference["answers"], strict=True)
                same = f"{sum(a == b for a, b in pairs)}/{len(reference['answers'])}"
            out.append(f"| {LABELS[system]} | {score['perplexity']:.3f} | {same} |")
    for note in d.get("notes", []):
        out += ["", f"Note: {note}"]
    if errors := d.get("errors"):
        out += ["", "Failed in this run: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    out += ["", f"![throughput and TTFT by concurrency]({plot_name})"]
    return "\n".join(out)


def targets(res: Result) -> str:
    """Issue 6's targets, each as a ratio measured in this run."""
    d, c = res.data, 32
    tput = res.get("loraswap", c, "output_throughput")
    mixed = res.runs.get(("loraswap", "mixed", c), {}).get("output_throughput")
    mixed_eager = res.runs.get(("loraswap-eager", "mixed", c), {}).get("output_throughput")
    eager_ready = (d.get("ready_s") or {}).get("loraswap-eager")
    jit, ready = d.get("jit") or {}, (d.get("ready_s") or {}).get("loraswap")
    single = max(
        (res.get(s, 1, "output_throughput") or 0 for s in ("loraswap", "loraswap-w8a8")),
        default=0,
    )
    rows = [
        ("tok/s at 32 streams vs plain vLLM (same args)", ">= 0.95x", tput,
         res.get("vllm", c, "output_throughput"), lambda r: r >= 0.95),
        ("TTFT p50 at 32 streams vs plain vLLM", "<= 1.1x",
         res.get("loraswap", c, "median_ttft_ms"), res.get("vllm", c, "median_ttft_ms"),
         lambda r: r <= 1.1),
        ("tok/s at 32 streams vs hand-rolled", ">= 4x", tput, res.get("hf", c, "output_throughput"),
         lambda r: r >= 4),
        ("mixed base + 8 adapters vs the engine with LoRA off", ">= 0.8x", mixed,
         res.get("vllm-nolora", c, "output_throughput"), lambda r: r >= 0.8),
        ("the same, loraswap eager (LORASWAP_COMPILE_LORA=false)", ">= 0.8x", mixed_eager,
         res.get("vllm-nolora", c, "output_throughput"), lambda r: r >= 0.8),
        ("JIT load: TTFT added (ms)", "<= 200 ms", jit.get("jit_added_ms_median"), 1.0,
         lambda r: r <= 200),
        ("JIT load: base TTFT p99 during loads vs without", "<= 1.25x",
         jit.get("base_ttft_p99_ms_during_loads"), jit.get("base_ttft_p99_ms_reference"),
         lambda r: r <= 1.25),
        ("warm start to /readyz (s)", "<= 45 s", ready, 1.0, lambda r: r <= 45),
        ("warm start to /readyz vs plain vLLM (same args)", "<= 1.0x", ready,
         (d.get("ready_s") or {}).get("vllm"), lambda r: r <= 1.0),
        ("start to /readyz, loraswap eager (s)", "reported", eager_ready, 1.0,
         lambda r: True),
        ("single stream tok/s (best of bf16, W8A8) vs llama.cpp Q4_1", ">= 1x (close the gap)",
         single or None, res.get("llamacpp", 1, "output_throughput"), lambda r: r >= 1),
    ]  # fmt: skip
    out = ["| target | wanted | measured | holds |", "| --- | --- | ---: | --- |"]
    for name, wanted, value, reference, ok in rows:
        if value is None or not reference:
            out.append(f"| {name} | {wanted} | n/a | not measured |")
            continue
        r = value / reference
        shown = f"{r:.2f}x" if reference != 1.0 else f"{r:.0f}"
        out.append(f"| {name} | {wanted} | {shown} | {'yes' if ok(r) else '**no**'} |")
    return "\n".join(out)


def plot(res: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = res.concurrencies()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(res.systems()))
    for i, system in enumerate(res.systems()):
        xs = [j + i * width for j in range(len(conc))]
        for ax, key in ((ax1, "output_throughput"), (ax2, "median_ttft_ms")):
            ax.bar(xs, [res.get(system, c, key) or 0 for c in conc], width, label=system)
    for ax, title in ((ax1, "output tokens/s (higher is better)"), (ax2, "TTFT p50 ms (log)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(conc))], [f"c={c}" for c in conc])
        ax.set_title(title)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M on {res.data['machine']['cores']} CPU cores, {res.data['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markers(kind: str | None) -> tuple[str, str]:
    """Each CPU kind keeps its own section; results from before kinds were recorded keep the
    original markers."""
    if kind is None:
        return START, END
    return f"<!-- bench:start:{kind} -->", f"<!-- bench:end:{kind} -->"


def main() -> None:
    path = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else max(RESULTS.glob("bench-*.json"))
    res = Result(json.loads(path.read_text()))
    kind = res.data["machine"].get("cpu_kind")
    plot_path = PLOT if kind is None else PLOT.with_name(f"{PLOT.stem}-{kind}{PLOT.suffix}")
    plot(res, plot_path)
    start, end = markers(kind)
    block = f"{start}\n<!-- generated by benchmarks/report.py from {path.relative_to(ROOT)} -->\n"
    if kind is not None:
        fingerprint = res.data["machine"]["cpu_fingerprint"]
        choices = res.data.get("auto_choices", {})
        block += (
            f"CPU kind `{kind}`: {fingerprint['model']}, {fingerprint['cores']} cores, flags "
            f"{', '.join(fingerprint['flags'])}. `auto` chose: "
            + "; ".join(f"{n} = {c['value']} ({c['reason']})" for n, c in choices.items())
            + "\n\n"
        )
    block += "### Targets\n\n" + targets(res) + "\n\n### Figures\n\n"
    block += tables(res, plot_path.name) + f"\n{end}"
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if start not in text:
        text += f"\n## On CPU kind `{kind}`\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOC.write_text(head + block + tail)
    print(f"wrote {DOC.relative_to(ROOT)} and {plot_path.relative_to(ROOT)} from {path.name}")


if __name__ == "__main__":
    main()
