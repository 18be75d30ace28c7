"""What a LoRA-aware router reads (loraswap.router_metrics), without an engine: adapters under
the names requests use, and the residency series ``vllm:lora_adapter_loaded``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from loraswap import metrics, router_metrics
from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.residency import Residency
from loraswap.router_metrics import VIEW, SnapshotGauge, by_request_names, request_names
from loraswap.vllm_plugin import lora_metric_names
from tests.test_residency import FakeEngine

U1, U2, J1 = AdapterKey("uppercase", "v1"), AdapterKey("uppercase", "v2"), AdapterKey("json", "v1")


class FakeCatalog:
    """Alias name -> the version it points at; pins by adapter name (as the catalog has them)."""

    def __init__(self, aliases: dict[str, str], pins: set[str] | None = None) -> None:
        self.aliases = aliases
        self.pins = pins or set()

    @property
    def state(self) -> SimpleNamespace:
        adapters = {n: SimpleNamespace(alias=SimpleNamespace(version=v))
                    for n, v in self.aliases.items()}  # fmt: skip
        return SimpleNamespace(adapters=adapters)

    def pinned_keys(self) -> set[AdapterKey]:
        return {AdapterKey(n, self.aliases[n]) for n in self.pins}


@dataclass
class Stats:
    """The two fields of vLLM's SchedulerStats this touches."""

    running_lora_adapters: dict[str, int] = field(default_factory=dict)
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)


@pytest.fixture(autouse=True)
def single_process(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(metrics.labels_of, "limit", 100)
    yield
    VIEW._residency = None
    VIEW.recent.clear()
    VIEW.refresh()


def residency_for(catalog: FakeCatalog, *keys: AdapterKey) -> Residency:
    res = Residency(FakeEngine(), 8, catalog.pinned_keys)  # as the registry builds it
    for i, key in enumerate(keys):
        res.expose(key, i + 1, Path(f"/adapters/{key}"))
    return res


def loaded_series() -> set[tuple[str, str, str]]:
    return set(VIEW.snapshot())


# --- names -------------------------------------------------------------------------------------
def test_alias_first_then_name_at_version():
    catalog = FakeCatalog({"uppercase": "v1"})
    assert request_names("uppercase@v1", catalog) == ["uppercase", "uppercase@v1"]
    assert request_names("uppercase@v2", catalog) == ["uppercase@v2"]  # the alias is elsewhere
    assert request_names("json@v1", catalog) == ["json@v1"]  # not in the catalog (yet)
    assert request_names("not-a-key", catalog) == ["not-a-key"]
    assert request_names("uppercase@v1", None) == ["uppercase@v1"]


def test_counts_under_request_names_without_idle_adapters():
    catalog = FakeCatalog({"uppercase": "v1", "json": "v2"})
    counts = {"uppercase@v1": 2, "uppercase@v2": 1, "json@v1": 0}
    assert by_request_names(counts, catalog) == {"uppercase": 2, "uppercase@v1": 2,
                                                 "uppercase@v2": 1}  # fmt: skip


def test_renamed_stats_carry_both_names_and_leave_vllms_untouched():
    res = residency_for(FakeCatalog({"uppercase": "v1"}), U1, J1)  # watched (weakly) meanwhile
    assert VIEW.residency is res
    # vLLM 0.32 writes every adapter in flight into both dicts, with 0 where it has none.
    stats = Stats({"uppercase@v1": 1, "json@v1": 0}, {"uppercase@v1": 0, "json@v1": 3})
    renamed = VIEW.renamed(stats, 2)
    # What vLLM's record() turns into the labels: ",".join(keys).
    assert ",".join(renamed.running_lora_adapters) == "uppercase,uppercase@v1"
    assert ",".join(renamed.waiting_lora_adapters) == "json@v1"
    assert stats == Stats({"uppercase@v1": 1, "json@v1": 0}, {"uppercase@v1": 0, "json@v1": 3})
    empty = Stats()
    assert VIEW.renamed(empty, 2) is empty


def test_wrapped_record_gives_vllm_the_renamed_stats(caplog):
    res = residency_for(FakeCatalog({"uppercase": "v1"}), U1)
    assert VIEW.residency is res
    seen: list[Stats] = []

    def vllms_record(self, stats, *args, **kwargs):
        seen.append(stats)

    record = lora_metric_names.wrap(vllms_record, VIEW.renamed)
    logger_with_lora = SimpleNamespace(gauge_lora_info=object(), max_lora=4)
    stats = Stats({"uppercase@v1": 1}, {})
    record(logger_with_lora, stats, None, mm_cache_stats=None, engine_idx=0)
    assert list(seen[-1].running_lora_adapters) == ["uppercase", "uppercase@v1"]
    record(SimpleNamespace(gauge_lora_info=None), stats, None)  # LoRA off: as it is
    assert seen[-1] is stats

    def broken(*_):
        raise RuntimeError("boom")

    record = lora_metric_names.wrap(vllms_record, broken)
    with caplog.at_level(logging.WARNING):
        record(logger_with_lora, stats, None)
        record(logger_with_lora, stats, None)
    assert seen[-1] is stats and seen[-2] is stats  # vLLM still records, under its own names
    assert caplog.text.count("LoRA adapter names for routers failed") == 1


# --- residency series --------------------------------------------------------------------------
def test_series_follow_loads_engine_steps_and_evictions():
    catalog = FakeCatalog({"uppercase": "v1", "json": "v1"})
    res = residency_for(catalog, U1, J1)
    assert loaded_series() == set()
    asyncio.run(res.ensure_loaded(U1))  # in the engine's host memory, not run yet
    assert loaded_series() == {("uppercase", "cpu", "false"), ("uppercase@v1", "cpu", "false")}
    VIEW.observe(["uppercase@v1"], max_loras=1)  # a step ran it: it took the one slot
    assert loaded_series() == {("uppercase", "gpu", "false"), ("uppercase@v1", "gpu", "false")}
    asyncio.run(res.ensure_loaded(J1))
    VIEW.observe(["json@v1"], max_loras=1)  # the slot went to json
    assert loaded_series() == {("uppercase", "cpu", "false"), ("uppercase@v1", "cpu", "false"),
                               ("json", "gpu", "false"), ("json@v1", "gpu", "false")}  # fmt: skip
    asyncio.run(res.evict(U1))
    assert loaded_series() == {("json", "gpu", "false"), ("json@v1", "gpu", "false")}
    text = generate_latest(REGISTRY).decode()
    assert 'vllm:lora_adapter_loaded{adapter_name="json",level="gpu",pinned="false"} 1.0' in text
    assert 'adapter_name="uppercase"' not in text  # gone, not 0
    asyncio.run(res.forget(J1))
    assert loaded_series() == set()


def test_a_pinned_adapter_holds_a_slot_and_says_so():
    catalog = FakeCatalog({"uppercase": "v1", "json": "v1"}, pins={"uppercase"})
    res = residency_for(catalog, U1, J1)
    asyncio.run(res.pin(U1))
    asyncio.run(res.ensure_loaded(J1))
    VIEW.observe(["json@v1"], max_loras=2)
    assert loaded_series() == {("uppercase", "gpu", "true"), ("uppercase@v1", "gpu", "true"),
                               ("json", "gpu", "false"), ("json@v1", "gpu", "false")}  # fmt: skip
    VIEW.observe(["json@v1"], max_loras=1)  # the pin takes the only slot
    assert ("json", "cpu", "false") in loaded_series()


def test_an_alias_moving_renames_the_loaded_versions():
    catalog = FakeCatalog({"uppercase": "v1"})
    res = residency_for(catalog, U1, U2)
    asyncio.run(res.ensure_loaded(U1))
    asyncio.run(res.ensure_loaded(U2))
    assert ("uppercase", "cpu", "false") in loaded_series()
    catalog.aliases["uppercase"] = "v2"
    assert loaded_series() == {("uppercase@v1", "cpu", "false"), ("uppercase", "cpu", "false"),
                               ("uppercase@v2", "cpu", "false")}  # fmt: skip
    catalog.aliases["uppercase"] = "v3"  # a version not loaded here
    assert loaded_series() == {("uppercase@v1", "cpu", "false"), ("uppercase@v2", "cpu", "false")}


def test_series_are_bounded_like_the_per_adapter_series(monkeypatch):
    monkeypatch.setattr(metrics.labels_of, "limit", 2)
    keys = [AdapterKey(f"a{i}", "v1") for i in range(5)]
    res = residency_for(FakeCatalog({}), *keys)
    for key in keys:
        asyncio.run(res.ensure_loaded(key))
    VIEW.observe(["a0@v1"], max_loras=1)  # the oldest, but in a slot: it keeps its series
    assert loaded_series() == {("a0@v1", "gpu", "false"), ("a4@v1", "cpu", "false")}


def test_the_catalog_is_found_through_a_real_registry(tmp_path: Path, base_shapes):
    from loraswap.adapters.registry import AdapterRegistry
    from loraswap.config import Settings
    from tests.conftest import SHIPPED

    settings = Settings(
        adapter_roots=[SHIPPED], registry_uri=str(tmp_path / "registry.json"),
        state_dir=tmp_path / "state", adapter_cache_dir=tmp_path / "cache", registry_poll_s=0,
    )  # fmt: skip
    registry = AdapterRegistry(settings, base_shapes, FakeEngine())
    assert VIEW.residency is registry.residency and VIEW.catalog is registry.catalog
    asyncio.run(registry.register("uppercase", str(SHIPPED / "uppercase"), "v1", load=True))
    assert loaded_series() == {("uppercase", "cpu", "false"), ("uppercase@v1", "cpu", "false")}
    assert [m for m, k in registry.model_ids() if k == U1] == ["uppercase", "uppercase@v1"]


# --- export -----------------------------------------------------------------------------------
def multiprocess_text(directory: Path) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode()


def test_multiprocess_snapshot_file_lets_series_leave(tmp_path: Path, monkeypatch):
    """BentoML's /metrics reads PROMETHEUS_MULTIPROC_DIR, where prometheus_client cannot remove
    a series: the snapshot file is replaced whole; a dead process's file is cleared."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    labels = ("adapter_name", "level", "pinned")
    gauge = SnapshotGauge("vllm:lora_adapter_loaded", "help", labels, tag="one")
    stale = tmp_path / f"{router_metrics.FILE_PREFIX.format(tag='two')}999999999.db"
    gauge.publish({("uppercase", "gpu", "false"): 1.0, ("uppercase@v1", "gpu", "false"): 1.0})
    shutil.copy(gauge.path, stale)
    text = multiprocess_text(tmp_path)
    line = 'vllm:lora_adapter_loaded{adapter_name="uppercase",level="gpu",pinned="false"} 1.0'
    assert line in text and "pid=" not in text

    fresh = SnapshotGauge("vllm:lora_adapter_loaded", "help", labels, tag="two")
    fresh.publish({("json@v1", "cpu", "true"): 1.0})
    assert not stale.exists()  # no process 999999999
    gauge.publish({})
    text = multiprocess_text(tmp_path)
    assert 'adapter_name="uppercase' not in text
    assert 'vllm:lora_adapter_loaded{adapter_name="json@v1",level="cpu",pinned="true"} 1.0' in text
    os.remove(fresh.path)  # emptied by another `bentoml serve`: written again on the next publish
    fresh.publish({("json@v1", "cpu", "true"): 1.0})
    assert Path(fresh.path).exists()
    assert not list(tmp_path.glob("*.tmp"))


# --- the vLLM patch ----------------------------------------------------------------------------
def test_patch_switch_and_version_guard(monkeypatch):
    import vllm
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    lora_metric_names.uninstall()
    vllms = PrometheusStatLogger.record
    try:
        monkeypatch.setenv(lora_metric_names.ENV_VAR, "0")
        assert not lora_metric_names.ensure_installed(VIEW.renamed)
        monkeypatch.delenv(lora_metric_names.ENV_VAR)
        monkeypatch.setattr(vllm, "__version__", "0.99.1")
        assert not lora_metric_names.ensure_installed(VIEW.renamed)
        assert PrometheusStatLogger.record is vllms
        monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
        assert lora_metric_names.ensure_installed(VIEW.renamed)
        assert PrometheusStatLogger.record.__wrapped__ is vllms
        assert lora_metric_names.ensure_installed(VIEW.renamed)  # once
        assert PrometheusStatLogger.record.__wrapped__ is vllms
    finally:
        lora_metric_names.uninstall()
    assert PrometheusStatLogger.record is vllms
