"""Per-adapter Prometheus series, exported through BentoML's ``/metrics`` beside vLLM's."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("adapter", "version")

REQUESTS = Counter("loraswap_adapter_requests", "Requests served per adapter version.", LABELS)
ERRORS = Counter("loraswap_adapter_errors", "Requests answered with an error.", LABELS)
PROMPT_TOKENS = Counter("loraswap_adapter_prompt_tokens", "Prompt tokens per adapter.", LABELS)
GENERATION_TOKENS = Counter(
    "loraswap_adapter_generation_tokens", "Generated tokens per adapter.", LABELS
)
LOAD_SECONDS = Histogram(
    "loraswap_adapter_load_seconds",
    "Time to load an adapter into the engine.",
    LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
RESIDENT = Gauge(
    "loraswap_adapter_resident", "1 while the adapter is loaded in the engine.", LABELS
)
EVICTIONS = Counter("loraswap_adapter_evictions", "LRU evictions from the engine.", LABELS)


def split_key(key: str) -> tuple[str, str]:
    name, _, version = key.partition("@")
    return name, version


def record_tokens(key: str, prompt_tokens: int, generated: int) -> None:
    PROMPT_TOKENS.labels(*split_key(key)).inc(prompt_tokens)
    GENERATION_TOKENS.labels(*split_key(key)).inc(generated)
