"""Per-adapter Prometheus series, exported through BentoML's ``/metrics`` beside vLLM's.

Label values are bounded: the first ``metrics_adapter_series`` adapter versions seen get their
own series, later ones share ``adapter="other"``, so ``/metrics`` stays small with thousands of
adapters (``/admin/traffic`` and ``/admin/adapters`` still count each version).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from statistics import fmean, median
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .engine_runs import EngineRun

LABELS = ("adapter", "version")

REQUESTS = Counter("loraswap_adapter_requests", "Requests served per adapter version.", LABELS)
ERRORS = Counter("loraswap_adapter_errors", "Requests answered with an error.", LABELS)
PROMPT_TOKENS = Counter("loraswap_adapter_prompt_tokens", "Prompt tokens per adapter.", LABELS)
GENERATION_TOKENS = Counter(
    "loraswap_adapter_generation_tokens", "Generated tokens per adapter.", LABELS
)
LOADS = Counter("loraswap_adapter_loads", "Loads into the engine per adapter version.", LABELS)
# One histogram for all adapters (per-version buckets would dominate /metrics with many
# adapters; each version's last load time is in /admin/adapters).
LOAD_SECONDS = Histogram(
    "loraswap_adapter_load_seconds",
    "Time to load an adapter into the engine (all adapters).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
RESIDENT = Gauge(
    "loraswap_adapter_resident",
    '1 while the adapter is loaded in the engine (adapter="other": how many of those are).',
    LABELS,
)
EVICTIONS = Counter("loraswap_adapter_evictions", "LRU evictions from the engine.", LABELS)
SHADOW_RUNS = Counter(
    "loraswap_shadow_runs",
    "Shadow requests by outcome: done, failed, dropped (queue full), preempted (aborted by "
    "client traffic at every start).",
    ["outcome"],
)
SHADOW_PENDING = Gauge("loraswap_shadow_pending", "Shadow requests queued or running.")
SLOT_WAITS = Counter(
    "loraswap_adapter_slot_waits",
    "Requests that found every adapter slot serving other adapters, by outcome: admitted "
    "(a slot freed in time) or refused (429 after LORASWAP_ADAPTER_SLOT_WAIT_S).",
    ["outcome"],
)
SLOT_WAITING = Gauge("loraswap_adapter_slot_waiting", "Requests waiting for an adapter slot.")
SLOT_WAIT_SECONDS = Histogram(
    "loraswap_adapter_slot_wait_seconds",
    "How long admitted requests waited for an adapter slot.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


OTHER = ("other", "")


class AdapterLabels:
    """(adapter, version) label values: the first ``limit`` versions keep their own."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.named: set[tuple[str, str]] = set()

    def __call__(self, key: Any) -> tuple[str, str]:
        pair = (str(key[0]), str(key[1]))
        if pair in self.named:
            return pair
        if len(self.named) < self.limit:
            self.named.add(pair)
            return pair
        return OTHER


labels_of = AdapterLabels()


def set_resident(key: Any, resident: bool) -> None:
    """1/0 for a version with its own series; the count of resident ones in ``other``."""
    labels = labels_of(key)
    gauge = RESIDENT.labels(*labels)
    if labels != OTHER:
        gauge.set(int(resident))
    elif resident:
        gauge.inc()
    else:
        gauge.dec()


def split_key(key: str) -> tuple[str, str]:
    name, _, version = key.partition("@")
    return name, version


def record_tokens(key: str, prompt_tokens: int, generated: int) -> None:
    labels = labels_of(split_key(key))
    PROMPT_TOKENS.labels(*labels).inc(prompt_tokens)
    GENERATION_TOKENS.labels(*labels).inc(generated)


class ModelTraffic:
    """One model's engine runs: totals and the latest timings."""

    def __init__(self, window: int) -> None:
        self.runs = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.unfinished = 0  # aborted or failed in the engine
        self.latencies: deque[float] = deque(maxlen=window)
        self.ttfts: deque[float] = deque(maxlen=window)


class TrafficStats:
    """Per served model (base model and each ``adapter@version``): runs, tokens, and latency
    over the last ``window`` runs, for ``/admin/traffic`` and the console. Bounded: the least
    recently used models beyond ``max_models`` are dropped (Prometheus keeps the totals)."""

    def __init__(self, window: int = 256, max_models: int = 2048) -> None:
        self.window = window
        self.max_models = max_models
        self.models: OrderedDict[str, ModelTraffic] = OrderedDict()

    def record(self, model: str, run: EngineRun) -> None:
        entry = self.models.get(model)
        if entry is None:
            entry = self.models[model] = ModelTraffic(self.window)
            if len(self.models) > self.max_models:
                self.models.popitem(last=False)
        else:
            self.models.move_to_end(model)
        entry.runs += 1
        entry.prompt_tokens += run.prompt_tokens
        entry.generation_tokens += run.completion_tokens
        if run.latency_s is None:
            entry.unfinished += 1
            return
        entry.latencies.append(run.latency_s)
        if run.ttft_s is not None:
            entry.ttfts.append(run.ttft_s)

    def rows(self) -> list[dict[str, Any]]:
        def stat(f: Any, values: deque[float]) -> float | None:
            return round(f(values), 4) if values else None

        return [
            {"model": model, "requests": t.runs, "unfinished": t.unfinished,
             "prompt_tokens": t.prompt_tokens, "generation_tokens": t.generation_tokens,
             "latency_p50_s": stat(median, t.latencies), "latency_mean_s": stat(fmean, t.latencies),
             "ttft_p50_s": stat(median, t.ttfts), "window": len(t.latencies)}
            for model, t in sorted(self.models.items())
        ]  # fmt: skip


TRAFFIC = TrafficStats()
