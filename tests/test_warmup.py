"""The CPU engine's short compile warm-up (loraswap.vllm_plugin.warmup): a stand-in model runner
records how many tokens vLLM's warm-up was asked to run; the real engine's start runs it in
every server test (and its cold compile in CI, whose compile cache starts empty)."""

from __future__ import annotations

from types import SimpleNamespace

from loraswap.vllm_plugin import warmup


class Runner:
    """vLLM's CPUModelRunner as the warm-up sees it: it profiles ``max_num_tokens`` tokens."""

    def __init__(self, kv_cache_bytes: int | None) -> None:
        self.cache_config = SimpleNamespace(kv_cache_memory_bytes=kv_cache_bytes)
        self.max_num_tokens = 2048
        self.warmed_with: list[int] = []

    def warming_up_model(self) -> None:
        self.warmed_with.append(self.max_num_tokens)


def test_a_given_kv_cache_size_warms_up_with_a_few_tokens_then_restores_the_budget() -> None:
    runner = Runner(kv_cache_bytes=2 << 30)
    warmup._short(Runner.warming_up_model)(runner)
    assert runner.warmed_with == [warmup.WARMUP_TOKENS]
    assert runner.max_num_tokens == 2048


def test_a_kv_cache_sized_from_memory_keeps_vllms_full_run() -> None:
    runner = Runner(kv_cache_bytes=None)
    warmup._short(Runner.warming_up_model)(runner)
    assert runner.warmed_with == [2048]


def test_a_budget_below_the_warm_up_is_kept() -> None:
    runner = Runner(kv_cache_bytes=1 << 30)
    runner.max_num_tokens = 8
    warmup._short(Runner.warming_up_model)(runner)
    assert runner.warmed_with == [8]


def test_only_an_engine_process_is_patched() -> None:
    """The API process (and this test's) never imports the model runner for it."""
    warmup.install()
    assert not warmup._original
