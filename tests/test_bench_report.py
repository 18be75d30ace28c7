"""The benchmark report's logic (pure): ratios, targets and the generated block of the docs page."""

from __future__ import annotations

import sys

from tests.server import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import report


def run(system: str, concurrency: int, tput: float, ttft: float, scenario: str = "base") -> dict:
    return {
        "system": system, "scenario": scenario, "concurrency": concurrency, "completed": 8,
        "failed": 0, "output_throughput": tput, "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 2,
        "median_tpot_ms": 10.0,
    }  # fmt: skip


RESULT = {
    "started": "2026-11-24T00:00:00+00:00",
    "machine": {"cpu": "test", "cores": 2, "memory_gib": 1, "versions": {}, "git": "abc"},
    "workload": {"input_tokens": 128, "output_tokens": 64, "adapters": 8, "load_generator": "x"},
    "settings": {},
    "runs": [
        run("loraswap", 32, 400.0, 1000.0),
        run("loraswap", 32, 250.0, 1500.0, "mixed"),
        run("vllm", 32, 380.0, 1000.0),
        run("vllm-nolora", 32, 600.0, 800.0),
        run("hf", 32, 50.0, 9000.0),
        run("loraswap", 1, 40.0, 50.0),
        run("llamacpp", 1, 100.0, 30.0),
    ],
    "jit": {
        "jit_added_ms_median": 250.0,
        "base_ttft_p99_ms_during_loads": 110.0,
        "base_ttft_p99_ms_reference": 100.0,
    },
    "ready_s": {"loraswap": 44.0},
}


def test_targets_are_ratios_with_verdicts():
    rows = {
        line.split("|")[1].strip(): line.split("|")[3:5]
        for line in report.targets(report.Result(RESULT)).splitlines()[2:]
    }
    assert [c.strip() for c in rows["tok/s at 32 streams vs plain vLLM (same args)"]] == [
        "1.05x", "yes",
    ]  # fmt: skip
    assert rows["tok/s at 32 streams vs hand-rolled"][1].strip() == "yes"  # 8x
    assert rows["mixed base + 8 adapters vs the engine with LoRA off"][1].strip() == "**no**"
    assert rows["JIT load: TTFT added (ms)"][1].strip() == "**no**"  # 250 ms > 200 ms
    assert rows["warm start to /readyz (s)"][1].strip() == "yes"
    assert "0.40x" in rows["single stream tok/s (best of bf16, W8A8) vs llama.cpp Q4_1"][0]


def test_missing_systems_say_not_measured():
    partial = {**RESULT, "runs": RESULT["runs"][:1], "jit": None, "ready_s": None}
    text = report.targets(report.Result(partial))
    assert text.count("not measured") == 11  # every target row
    tables = report.tables(report.Result(partial), "plot.png")
    assert "| loraswap (OpenAI route) | 32 | 400.0 |" in tables
