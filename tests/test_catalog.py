"""The adapter catalog without an engine: versions, aliases, canary draws, and its JSON document
form (`registry_document`; rows: test_catalog_rows.py): persistence, merges, compare-and-swap."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any
from uuid import uuid4

import pytest
from fsspec.asyn import sync

from loraswap import documents as documents_module
from loraswap.adapters.catalog import (
    AdapterRecord,
    AliasRecord,
    Catalog,
    CatalogState,
    CatalogStore,
    VersionRecord,
)
from loraswap.adapters.keys import AdapterKey, split_model
from loraswap.documents import _flocked, _s3_put, _s3_read
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


# ----- concurrent writers (compare-and-swap) --------------------------------------------------
class SlowReads:
    """A store whose reads come back late: two replicas read the same revision, then both write
    (the lost-update race, nearly every commit). Writes go to the real store."""

    def __init__(self, store: CatalogStore) -> None:
        self.store = store

    def load(self) -> CatalogState:
        state = self.store.load()
        time.sleep(random.uniform(0.001, 0.01))
        return state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def adder(name: str):
    """A mutation as the registry writes them: it numbers the record from the state it is given,
    so running it again on a newer state must not count twice."""

    async def add(state: CatalogState) -> None:
        state.adapters[name] = AdapterRecord(name=name, alias=AliasRecord(version="v1"))
        state.next_lora_id += 1

    return add


def race(uri: str, options: dict | None = None, commits: int = 15) -> CatalogState:
    """Two replicas, each committing ``commits`` different adapters, at the same time."""
    replicas = {p: Catalog(SlowReads(CatalogStore(uri, options)), BASE) for p in "ab"}

    async def run(prefix: str, cat: Catalog) -> None:
        async def adopt(state: CatalogState) -> None:
            cat.state = state

        for i in range(commits):
            await cat.commit(adder(f"{prefix}{i}"), adopt)

    async def main() -> None:
        await asyncio.gather(*(run(p, cat) for p, cat in replicas.items()))

    asyncio.run(main())
    final = CatalogStore(uri, options).load()
    assert set(final.adapters) == {f"{p}{i}" for p in "ab" for i in range(commits)}
    assert final.revision == 2 * commits and final.next_lora_id == 2 * commits + 1
    return final


def test_concurrent_commits_on_a_local_document_lose_nothing(tmp_path):
    race(str(tmp_path / "registry.json"))


def test_concurrent_commits_on_s3_lose_nothing(s3, monkeypatch):
    """Also forces the conditional PUT itself to lose: a pause between the GET that took the
    ETag and the PUT lets the other replica write first, so S3 (moto) answers 412. PUTs are
    serialised because moto's check-then-store is not atomic across its request threads."""
    refused = []
    one_at_a_time = asyncio.Lock()  # used on fsspec's I/O loop, where both replicas' PUTs run

    async def slow_put(fs: Any, path: str, data: bytes, condition: dict[str, str]) -> bool:
        await asyncio.sleep(random.uniform(0, 0.01))
        async with one_at_a_time:
            ok = await _s3_put(fs, path, data, condition)
        refused.append(not ok)
        return ok

    monkeypatch.setattr(documents_module, "_s3_put", slow_put)
    race(f"s3://{s3['bucket']}/race-{uuid4().hex}/registry.json", s3["options"], commits=10)
    assert any(refused), "the conditional PUT never had to refuse a write"


def test_s3_conditional_put_refuses_a_stale_etag(s3):
    store = CatalogStore(f"s3://{s3['bucket']}/cas-{uuid4().hex}/registry.json", s3["options"])
    fs, path = store._fs()
    assert sync(fs.loop, _s3_read, fs, path) == (0, {"IfNoneMatch": "*"})
    create = {"IfNoneMatch": "*"}
    assert store.save_if(CatalogState(revision=1), 0)
    assert not sync(fs.loop, _s3_put, fs, path, b"{}", create), "created meanwhile: 412"
    revision, match = sync(fs.loop, _s3_read, fs, path)
    assert revision == 1 and set(match) == {"IfMatch"}
    assert store.save_if(CatalogState(revision=2), 1)
    assert not sync(fs.loop, _s3_put, fs, path, b"{}", match), "changed since the read: 412"
    assert not store.save_if(CatalogState(revision=2), 1), "stale revision"
    assert store.load() == CatalogState(revision=2)


def test_local_save_if_compares_under_the_lock(tmp_path):
    store = CatalogStore(str(tmp_path / "registry.json"))
    assert store.save_if(CatalogState(revision=1), 0)
    assert not store.save_if(CatalogState(revision=1), 0), "stale revision"
    store.lock_timeout = 0.05
    with _flocked(tmp_path / "registry.json.lock", timeout=1):  # another writer is mid-write
        assert not store.save_if(CatalogState(revision=2), 1)
    assert store.save_if(CatalogState(revision=2), 1)
    assert store.load().revision == 2


def test_other_filesystems_write_and_read_back():
    store = CatalogStore(f"memory://loraswap-{uuid4().hex}/registry.json")
    assert store.save_if(CatalogState(revision=1), 0)
    assert not store.save_if(CatalogState(revision=1), 0), "stale revision"
    assert store.load().revision == 1


def test_commit_gives_409_when_the_conflict_persists(tmp_path):
    """Another replica writes right after each of our reads: every try is re-run on the newer
    document, then the caller gets a 409 telling it to retry; nothing of ours is written."""
    uri = str(tmp_path / "registry.json")
    rival = CatalogStore(uri)

    class Contested(SlowReads):
        def load(self) -> CatalogState:
            state = self.store.load()
            assert rival.save_if(
                state.model_copy(update={"revision": state.revision + 1}), state.revision
            )
            return state

    cat = Catalog(Contested(CatalogStore(uri)), BASE)
    cat.attempts = 3
    seen = []

    async def add(state: CatalogState) -> None:
        seen.append(state.revision)
        state.adapters["mine"] = AdapterRecord(name="mine", alias=AliasRecord(version="v1"))

    async def adopt(state: CatalogState) -> None:
        cat.state = state

    with pytest.raises(ApiError) as err:
        asyncio.run(cat.commit(add, adopt))
    assert err.value.status == 409 and "retry" in err.value.message
    assert seen == [0, 1, 2]
    final = rival.load()
    assert final.revision == 3 and "mine" not in final.adapters


def test_stored_revision_reads_the_head_and_falls_back_to_a_parse(tmp_path):
    store = CatalogStore(str(tmp_path / "registry.json"))
    assert store.stored_revision() == 0  # no document yet
    store.save(state_with(sql=["v1"]).model_copy(update={"revision": 41}))
    assert store.stored_revision() == 41
    # written by another tool, fields in another order: still right (a full parse)
    (tmp_path / "registry.json").write_text('{"adapters": {}, "revision": 7}')
    assert store.stored_revision() == 7
