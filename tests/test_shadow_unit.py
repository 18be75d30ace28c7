"""Shadow versions, promote/rollback, the audit log, stored comparisons, traffic stats and the
compare request, without an engine (the registry runs on a stand-in engine)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.registry import AdapterRegistry
from loraswap.adapters.slots import SlotGate
from loraswap.audit import AuditLog
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.metrics import TrafficStats
from loraswap.native.protocol import GenerateRequest
from loraswap.pipeline import EngineRun, RequestPipeline
from loraswap.shadows.runner import ShadowJob, shadow_job
from loraswap.shadows.store import Comparison, ComparisonStore
from loraswap.storage import Database
from loraswap.tenants import CURRENT
from loraswap.tenants.principal import ANONYMOUS, GLOBAL_ADMIN, Principal
from tests.conftest import SHIPPED
from tests.test_residency import FakeEngine

V1, V2, V3 = (AdapterKey("uppercase", v) for v in ("v1", "v2", "v3"))


@pytest.fixture
def registry(tmp_path: Path, base_shapes) -> AdapterRegistry:
    """``uppercase`` with v1 (the alias), v2 (the same weights) and v3 (the json adapter)."""
    root = tmp_path / "root"
    shutil.copytree(SHIPPED / "uppercase", root / "upper2")
    settings = Settings(
        adapter_roots=[SHIPPED, root], registry_uri=str(tmp_path / "registry.json"),
        state_dir=tmp_path / "state", adapter_cache_dir=tmp_path / "cache", registry_poll_s=0,
    )  # fmt: skip
    reg = AdapterRegistry(
        settings, base_shapes, FakeEngine(), AuditLog(Database.embedded(settings.state_dir))
    )

    async def setup() -> None:
        await reg.register("uppercase", str(SHIPPED / "uppercase"), "v1")
        await reg.register("uppercase", str(root / "upper2"), "v2", promote=False)
        await reg.register("uppercase", str(SHIPPED / "json"), "v3", promote=False)

    asyncio.run(setup())
    return reg


def test_shadow_is_drawn_at_its_rate_and_only_for_the_alias(registry):
    asyncio.run(registry.set_alias("uppercase", "v1", shadow_version="v2", shadow_rate=0.25))
    catalog = registry.catalog
    catalog.draw = lambda: 0.2
    assert registry.shadow_of("uppercase") == V2
    assert registry.resolve("uppercase") == V1  # the client is still served by the alias
    assert registry.shadow_of("uppercase@v1") is None  # a pinned version is never shadowed
    catalog.draw = lambda: 0.3
    assert registry.shadow_of("uppercase") is None
    alias = registry.describe("uppercase")["alias"]
    assert alias == {"version": "v1", "canary_version": None, "canary_weight": 0.0,
                     "shadow_version": "v2", "shadow_rate": 0.25}  # fmt: skip


def test_alias_refuses_unknown_versions_and_bad_rates(registry):
    with pytest.raises(ApiError) as exc:
        asyncio.run(registry.set_alias("uppercase", "v1", shadow_version="v9", shadow_rate=1))
    assert exc.value.status == 404
    with pytest.raises(ApiError) as exc:
        asyncio.run(registry.set_alias("uppercase", "v1", shadow_version="v2", shadow_rate=2))
    assert exc.value.status == 400


def test_promote_then_rollback_restores_the_alias_exactly(registry):
    asyncio.run(registry.set_alias("uppercase", "v1", "v3", 0.1, "v2", 1.0))
    with pytest.raises(ApiError) as exc:  # both set: the caller says which
        asyncio.run(registry.promote("uppercase"))
    assert exc.value.status == 409
    promoted = asyncio.run(registry.promote("uppercase", "shadow"))
    assert promoted["alias"]["version"] == "v2" and promoted["alias"]["shadow_version"] is None
    assert promoted["previous_alias"]["version"] == "v1"
    assert registry.resolve("uppercase") == V2
    back = asyncio.run(registry.rollback("uppercase"))
    assert back["alias"] == {"version": "v1", "canary_version": "v3", "canary_weight": 0.1,
                             "shadow_version": "v2", "shadow_rate": 1.0}  # fmt: skip
    assert back["previous_alias"] is None
    cleared = asyncio.run(registry.rollback("uppercase"))  # nothing to undo: canary, shadow off
    assert cleared["alias"]["canary_version"] is None and cleared["alias"]["shadow_version"] is None
    with pytest.raises(ApiError) as exc:
        asyncio.run(registry.rollback("uppercase"))
    assert exc.value.status == 409
    with pytest.raises(ApiError) as exc:
        asyncio.run(registry.promote("uppercase"))
    assert exc.value.status == 409


def test_promote_canary_and_survives_a_restart(registry, base_shapes):
    asyncio.run(registry.set_alias("uppercase", "v1", canary_version="v3", canary_weight=0.5))
    asyncio.run(registry.promote("uppercase"))
    reread = asyncio.run(registry.catalog.fetch())  # the persisted document
    assert reread.adapters["uppercase"].alias.version == "v3"
    assert reread.adapters["uppercase"].previous_alias.canary_version == "v3"


def test_deleting_the_shadow_version_turns_the_shadow_off(registry):
    asyncio.run(registry.set_alias("uppercase", "v1", shadow_version="v2", shadow_rate=1))
    asyncio.run(registry.delete("uppercase", "v2"))
    alias = registry.describe("uppercase")["alias"]
    assert alias["shadow_version"] is None and alias["shadow_rate"] == 0


def test_audit_log_says_who_did_what_newest_first(registry):
    token = CURRENT.set(Principal("acme", None, admin=True, key_id="k123"))
    try:
        asyncio.run(registry.set_alias("uppercase", "v1", shadow_version="v2", shadow_rate=1))
        asyncio.run(registry.promote("uppercase"))
        asyncio.run(registry.set_pinned("uppercase", True))
    finally:
        CURRENT.reset(token)
    entries = registry.audit.entries(lambda name: True)
    assert [e["action"] for e in entries] == ["pin", "promote", "alias", "register", "register",
                                              "register"]  # fmt: skip
    assert entries[0]["actor"] == "acme" and entries[0]["key_id"] == "k123"
    assert entries[1]["detail"]["from"] == "shadow"
    assert entries[1]["detail"]["after"]["version"] == "v2"
    assert entries[-1]["actor"] == ANONYMOUS.name
    assert registry.audit.entries(lambda name: name != "uppercase") == []  # scoped per caller
    assert len(registry.audit.entries(lambda name: True, limit=2)) == 2
    older = registry.audit.entries(lambda name: True, before=entries[1]["id"])
    assert older[0]["id"] == entries[2]["id"]


def comparison(adapter: str = "uppercase", same: bool = True, **kw) -> Comparison:
    fields = dict(
        tenant="admin", adapter=adapter, primary_version="v1", shadow_version="v2",
        route="/v1/chat/completions", prompt="user: hi", primary_text="HELLO",
        shadow_text="HELLO" if same else "hello", primary_tokens=2, shadow_tokens=3,
        primary_latency_s=0.5, shadow_latency_s=0.7, primary_ttft_s=0.1, shadow_ttft_s=0.2,
    )  # fmt: skip
    return Comparison(**(fields | kw))


def test_comparison_summary_counts_agreement_and_shows_differences(tmp_path):
    store = ComparisonStore(Database.embedded(tmp_path), retention_days=7, max_records=100)
    for same in (True, True, False):
        store.add(comparison(same=same))
    store.add(comparison(same=False, shadow_text=None, shadow_error="adapter broken",
                         shadow_tokens=None, shadow_latency_s=None))  # fmt: skip
    store.add(comparison(adapter="other"))
    pairs = store.summaries(lambda name: name == "uppercase")
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair["count"], pair["identical"], pair["shadow_errors"]) == (4, 2, 1)
    assert pair["identical_share"] == 0.5
    assert pair["mean_primary_tokens"] == 2 and pair["mean_shadow_tokens"] == 3
    assert pair["primary_latency_p50_s"] == 0.5 and pair["shadow_latency_p50_s"] == 0.7
    assert [s["shadow_error"] for s in pair["samples"]] == ["adapter broken", None]  # newest first
    assert pair["samples"][1]["shadow_text"] == "hello"
    assert [p["adapter"] for p in store.summaries(lambda n: True)] == ["other", "uppercase"]
    assert store.summaries(lambda n: True, adapter="other")[0]["count"] == 1


def test_comparison_store_stays_bounded(tmp_path):
    store = ComparisonStore(Database.embedded(tmp_path), retention_days=7, max_records=100)
    for _ in range(300):
        store.add(comparison())
    assert store.summaries(lambda n: True)[0]["count"] <= 200  # pruned every 100 inserts
    store.prune()
    assert store.summaries(lambda n: True)[0]["count"] == 100
    old = ComparisonStore(Database.embedded(tmp_path), retention_days=1e-9, max_records=100)
    time.sleep(0.01)
    old.prune()
    assert old.summaries(lambda n: True) == []


def test_only_single_prompt_chat_and_completions_are_shadowed():
    body = {"model": "uppercase", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    job = shadow_job("/v1/chat/completions", body, V1, V2, GLOBAL_ADMIN)
    assert job is not None and job.body["model"] == "uppercase@v2"
    assert job.body["stream"] is False and "stream_options" not in job.body
    assert body["model"] == "uppercase" and body["stream"] is True  # the client's is untouched
    assert shadow_job("/v1/completions", {"prompt": ["a", "b"]}, V1, V2, GLOBAL_ADMIN) is None
    assert shadow_job("/v1/completions", {"prompt": "a"}, V1, V2, GLOBAL_ADMIN) is not None
    assert shadow_job("/v1/responses", {"input": "a"}, V1, V2, GLOBAL_ADMIN) is None
    assert shadow_job("/v1/chat/completions", body, V2, V2, GLOBAL_ADMIN) is None  # canary = shadow


class ShadowingRegistry:
    def __init__(self) -> None:
        self.loaded: list[AdapterKey] = []
        self.slots = SlotGate(lambda: 8, 1.0, set)

    def resolve(self, model: str) -> AdapterKey | None:
        return V1 if model == "uppercase" else None

    def shadow_of(self, model: str) -> AdapterKey | None:
        return V2

    async def ensure_loaded(self, key: AdapterKey) -> None:
        self.loaded.append(key)

    def record_request(self, key: AdapterKey, ok: bool) -> None:
        pass


class Collector:
    def __init__(self) -> None:
        self.jobs: list[ShadowJob] = []

    def submit(self, job: ShadowJob) -> None:
        self.jobs.append(job)

    def yield_to_client(self) -> None:
        self.yielded = True


def test_pipeline_queues_the_shadow_after_a_successful_primary_only():
    pipe = RequestPipeline(Settings(default_max_tokens=None), ShadowingRegistry())
    pipe.shadows = Collector()
    body = {"model": "uppercase", "messages": [{"role": "user", "content": "hi"}]}

    async def admit_and_finish(ok: bool) -> None:
        admission = await pipe.admit("/v1/chat/completions", dict(body))
        assert admission.shadow is not None and admission.shadow.shadow == V2
        pipe.finish(admission, ok=ok)

    asyncio.run(admit_and_finish(False))
    assert pipe.shadows.jobs == []
    asyncio.run(admit_and_finish(True))
    assert len(pipe.shadows.jobs) == 1
    native = asyncio.run(pipe.admit("/generate_batch", {"model": "uppercase"}, background=True))
    assert native.shadow is None  # batch work is not shadowed


def test_traffic_stats_are_bounded_and_timed():
    stats = TrafficStats(window=3, max_models=2)
    for latency in (1.0, 2.0, 3.0, 4.0):
        stats.record("a@v1", EngineRun(prompt_tokens=5, completion_tokens=2, ttft_s=0.1,
                                       latency_s=latency))  # fmt: skip
    stats.record("a@v1", EngineRun(prompt_tokens=5))  # cut short: no timing
    stats.record("b@v1", EngineRun(latency_s=1.0))
    stats.record("c@v1", EngineRun(latency_s=1.0))  # evicts the least recently used
    rows = {r["model"]: r for r in stats.rows()}
    assert set(rows) == {"b@v1", "c@v1"}
    stats = TrafficStats(window=3)
    for latency in (1.0, 2.0, 3.0, 4.0):
        stats.record("a@v1", EngineRun(completion_tokens=2, latency_s=latency, ttft_s=0.1))
    row = stats.rows()[0]
    assert row["requests"] == 4 and row["generation_tokens"] == 8
    assert row["latency_p50_s"] == 3.0 and row["window"] == 3 and row["ttft_p50_s"] == 0.1


def test_compare_request_lists_distinct_models():
    req = GenerateRequest(model=["a", "b"], prompt="x")
    assert req.compared == ["a", "b"] and req.for_model("b").model == "b"
    assert GenerateRequest(model="a", prompt="x").compared is None
    for bad in (["a", "a"], [], [str(i) for i in range(9)]):
        with pytest.raises(ValueError):
            GenerateRequest(model=bad, prompt="x")


class SlowEngine:
    """A stand-in pipeline whose engine takes ``seconds`` per shadow and fills its capture."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.interactive = 0
        self.registry = ShadowingRegistry()
        self.started = 0

    async def call_vllm(self, path: str, body: dict, raw: object) -> None:
        from loraswap.pipeline import CAPTURE

        self.started += 1
        await asyncio.sleep(self.seconds)
        run = CAPTURE.get()
        run.text, run.completion_tokens, run.latency_s = "HELLO", 2, self.seconds


def test_shadows_run_on_idle_capacity_and_yield_to_clients(tmp_path):
    from loraswap.shadows.runner import ShadowRunner

    async def scenario() -> tuple[int, list]:
        engine = SlowEngine(0.3)
        store = ComparisonStore(Database.embedded(tmp_path), retention_days=1, max_records=100)
        runner = ShadowRunner(engine, store, concurrency=1, queue_size=4)
        body = {"model": "uppercase", "messages": [{"role": "user", "content": "hi"}]}
        job = shadow_job("/v1/chat/completions", body, V1, V2, GLOBAL_ADMIN)
        job.primary_run = EngineRun(text="HELLO", completion_tokens=2, latency_s=0.1)
        engine.interactive = 1  # a client request in flight: the shadow waits
        runner.submit(job)
        await asyncio.sleep(0.2)
        assert engine.started == 0
        engine.interactive = 0
        await asyncio.sleep(0.1)
        assert engine.started == 0  # idle, but not yet for the grace period
        await asyncio.sleep(0.25)
        assert engine.started == 1
        runner.yield_to_client()  # a client arrives: the shadow is aborted and queued again
        engine.interactive = 1
        await asyncio.sleep(0.1)
        engine.interactive = 0
        await asyncio.sleep(1.0)
        await runner.close()
        return engine.started, store.summaries(lambda n: True)

    started, pairs = asyncio.run(scenario())
    assert started == 2
    assert pairs[0]["count"] == 1 and pairs[0]["identical"] == 1
