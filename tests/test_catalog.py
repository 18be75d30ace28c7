"""The adapter catalog without an engine: versions, aliases, canary draws, persistence, merges."""

from __future__ import annotations

import asyncio

import pytest

from loraswap.adapters.catalog import (
    AdapterRecord,
    AliasRecord,
    Catalog,
    CatalogState,
    CatalogStore,
    VersionRecord,
)
from loraswap.adapters.keys import AdapterKey, split_model
from loraswap.errors import ApiError

BASE = "base-model"


def version(v: str, lora_id: int = 1, source: str = "adapters/x") -> VersionRecord:
    return VersionRecord(
        version=v, source=source, lora_int_id=lora_id, rank=8, alpha=16.0,
        target_modules=["q_proj"], size_bytes=1000, registered_at=0.0,
    )  # fmt: skip


def state_with(**adapters: list[str]) -> CatalogState:
    state = CatalogState()
    for name, versions in adapters.items():
        record = AdapterRecord(name=name, alias=AliasRecord(version=versions[-1]))
        for v in versions:
            record.versions[v] = version(v, state.next_lora_id)
            state.next_lora_id += 1
        state.adapters[name] = record
    return state


def catalog(tmp_path, draw=lambda: 0.5) -> Catalog:
    cat = Catalog(CatalogStore(str(tmp_path / "registry.json")), BASE, draw=draw)
    return cat


def test_adapter_key_round_trip():
    key = AdapterKey("sql", "v2")
    assert str(key) == "sql@v2" and AdapterKey.parse("sql@v2") == key
    assert tuple(key) == ("sql", "v2")  # metric labels
    with pytest.raises(ValueError):
        AdapterKey.parse("sql")
    assert split_model("sql") == ("sql", None) and split_model("sql@v1") == ("sql", "v1")


def test_resolve_base_alias_version_and_unknown(tmp_path):
    cat = catalog(tmp_path)
    cat.state = state_with(sql=["v1", "v2"])
    assert cat.resolve(BASE) is None
    assert cat.resolve("nope") is None
    assert cat.resolve("sql") == AdapterKey("sql", "v2")
    assert cat.resolve("sql@v1") == AdapterKey("sql", "v1")
    assert cat.resolve("sql@v9") is None


def test_canary_draw_splits_traffic(tmp_path):
    draws = iter([0.1, 0.9, 0.29, 0.3])
    cat = catalog(tmp_path, draw=lambda: next(draws))
    cat.state = state_with(sql=["v1", "v2"])
    cat.state.adapters["sql"].alias = AliasRecord(
        version="v1", canary_version="v2", canary_weight=0.3
    )
    got = [cat.resolve("sql").version for _ in range(4)]
    assert got == ["v2", "v1", "v2", "v1"]


def test_lookups_raise_404_in_openai_shape(tmp_path):
    cat = catalog(tmp_path)
    cat.state = state_with(sql=["v1"])
    with pytest.raises(ApiError) as err:
        cat.record("missing")
    assert err.value.status == 404 and err.value.body()["error"]["type"] == "NotFoundError"
    with pytest.raises(ApiError):
        cat.version(AdapterKey("sql", "v7"))


def test_next_version_skips_taken_names():
    record = AdapterRecord(name="a", alias=AliasRecord(version="v2"))
    record.versions = {"v2": version("v2"), "custom": version("custom")}
    assert record.next_version() == "v3"


def test_model_ids_and_pins(tmp_path):
    cat = catalog(tmp_path)
    cat.state = state_with(sql=["v1", "v2"], json=["v1"])
    cat.state.adapters["json"].pinned = True
    ids = dict(cat.model_ids())
    assert ids["sql"] == AdapterKey("sql", "v2") and ids["sql@v1"] == AdapterKey("sql", "v1")
    assert cat.pinned_keys() == {AdapterKey("json", "v1")}


def test_commit_persists_and_bumps_revision(tmp_path):
    cat = catalog(tmp_path)

    async def add(state: CatalogState) -> str:
        state.adapters["a"] = AdapterRecord(name="a", alias=AliasRecord(version="v1"))
        return "done"

    async def never(_: CatalogState) -> None:
        raise AssertionError("nothing newer on disk")

    assert asyncio.run(cat.commit(add, never)) == "done"
    assert cat.state.revision == 1
    on_disk = CatalogStore(str(tmp_path / "registry.json")).load()
    assert on_disk.revision == 1 and "a" in on_disk.adapters
    assert not list(tmp_path.glob("*.tmp*"))  # written by rename


def test_commit_merges_a_change_made_by_another_replica(tmp_path):
    """Replica B commits after replica A: B adopts A's document first, so nothing is lost."""
    a, b = catalog(tmp_path), catalog(tmp_path)
    adopted = []

    def adder(name: str):
        async def add(state: CatalogState) -> None:
            state.adapters[name] = AdapterRecord(name=name, alias=AliasRecord(version="v1"))

        return add

    async def adopt(cat: Catalog, state: CatalogState) -> None:
        adopted.append(state.revision)
        cat.state = state

    asyncio.run(a.commit(adder("from-a"), lambda s: adopt(a, s)))
    asyncio.run(b.commit(adder("from-b"), lambda s: adopt(b, s)))
    assert adopted == [1]
    final = CatalogStore(str(tmp_path / "registry.json")).load()
    assert set(final.adapters) == {"from-a", "from-b"} and final.revision == 2


def test_store_missing_document_is_empty(tmp_path):
    assert CatalogStore(str(tmp_path / "none.json")).load() == CatalogState()
