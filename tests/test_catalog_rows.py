"""The adapter catalog as database rows, on SQLite and on a real PostgreSQL: one transaction
per change that writes only what changed, replicas that converge by reading only newer rows,
concurrent changes from two replicas both kept, deletes that reach every replica, and the
registry document of 0.1.0 imported once."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from loraswap.adapters.catalog import AdapterRecord, AliasRecord, CatalogState, CatalogStore
from loraswap.adapters.catalog_rows import CatalogRows, CopyOnWrite, RowCatalog, diff, open_catalog
from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.registry import AdapterRegistry
from loraswap.config import Settings
from loraswap.storage import Database, schema
from tests.conftest import SHIPPED
from tests.postgres_server import new_database
from tests.test_catalog import BASE, state_with, version
from tests.test_residency import FakeEngine


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind (a new PostgreSQL database per test), migrated."""
    if request.param == "sqlite":
        yield migrated(f"sqlite:///{tmp_path / 'db.sqlite'}")
        return
    base = request.getfixturevalue("postgres_url")
    name = f"c_{secrets.token_hex(4)}"
    yield migrated(new_database(base, name))
    parsed = make_url(base)
    dsn = f"host={parsed.host} port={parsed.port} user={parsed.username} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def migrated(url: str) -> str:
    db = Database(url)
    assert db.engine is not None  # migrates
    db.close()
    return url


def replica(db_url: str) -> RowCatalog:
    """A replica's catalog: its own Database (own connections, own SQLite lock), started (the
    schema checked) before the test's threads run: Alembic is not for two threads at once."""
    db = Database(db_url)
    assert db.engine is not None
    return RowCatalog(CatalogRows(db), BASE)


def adder(name: str):
    """Adds ``name`` with one version numbered from the state it is given."""

    async def add(state: CatalogState) -> int:
        lora_id = state.next_lora_id
        record = AdapterRecord(name=name, alias=AliasRecord(version="v1"))
        record.versions["v1"] = version("v1", lora_id)
        state.adapters[name] = record
        state.next_lora_id += 1
        return lora_id

    return add


def deleter(name: str):
    async def delete(state: CatalogState) -> None:
        del state.adapters[name]

    return delete


def adopter(cat: RowCatalog, seen: list[set[str] | None]):
    async def adopt(state: CatalogState) -> None:
        seen.append(state.changed)
        cat.state = state

    return adopt


def stored_rows(db_url: str) -> dict[str, tuple[int, bool]]:
    """name -> (revision, deleted) as stored."""
    db = Database(db_url)
    with db.engine.connect() as conn:
        rows = conn.execute(select(schema.adapters)).all()
    db.close()
    return {r.name: (r.revision, r.deleted) for r in rows}


def test_a_mutation_sees_copies_and_only_what_it_changed_is_written() -> None:
    served = state_with(a=["v1"], b=["v1"], c=["v1"])
    view = CopyOnWrite(served.adapters)
    view["a"].pinned = True
    for record in view.values():  # handed out in bulk: copied too; changed in none
        record.alias = AliasRecord(version="v1")
    del view["b"]
    view["d"] = AdapterRecord(name="d", alias=AliasRecord(version="v1"))
    assert not served.adapters["a"].pinned and set(served.adapters) == {"a", "b", "c"}
    assert diff(served.adapters, view, view.touched) == {"a": view["a"], "b": None, "d": view["d"]}


def test_a_change_writes_only_the_adapters_it_changed(db_url: str) -> None:
    cat, seen = replica(db_url), []

    async def scenario() -> None:
        for name in ("a", "b", "c"):
            await cat.commit(adder(name), adopter(cat, seen))

        async def pin_b(state: CatalogState) -> None:
            state.adapters["b"].pinned = True

        await cat.commit(pin_b, adopter(cat, seen))

        async def read_only(state: CatalogState) -> str:
            return state.adapters["a"].alias.version  # read, not changed: nothing written

        assert await cat.commit(read_only, adopter(cat, seen)) == "v1"

    asyncio.run(scenario())
    assert seen == [], "nothing written elsewhere: nothing to adopt"
    assert cat.state.revision == 4 and cat.state.next_lora_id == 4
    assert stored_rows(db_url) == {"a": (1, False), "b": (4, False), "c": (3, False)}
    assert cat.state.adapters["b"].pinned and cat.pinned_keys() == {AdapterKey("b", "v1")}
    assert cat.rows.load().model_dump() == cat.state.model_dump()


def test_pins_follow_each_change(db_url: str) -> None:
    cat = replica(db_url)

    def pin(name: str, pinned: bool = True):
        async def change(state: CatalogState) -> None:
            state.adapters[name].pinned = pinned

        return change

    async def scenario() -> None:
        for change in (adder("a"), adder("b"), pin("a"), pin("b")):
            await cat.commit(change, adopter(cat, []))
        assert cat.pinned_keys() == {AdapterKey("a", "v1"), AdapterKey("b", "v1")}
        await cat.commit(pin("a", False), adopter(cat, []))
        assert cat.pinned_keys() == {AdapterKey("b", "v1")}
        await cat.commit(deleter("b"), adopter(cat, []))
        assert cat.pinned_keys() == set() == cat.state.pinned_keys()

    asyncio.run(scenario())


def test_a_failed_change_leaves_the_served_state_and_the_rows_alone(db_url: str) -> None:
    cat = replica(db_url)

    async def scenario() -> None:
        await cat.commit(adder("a"), adopter(cat, []))
        served = cat.state

        async def broken(state: CatalogState) -> None:
            state.adapters["a"].alias = AliasRecord(version="v9")
            state.adapters["a"].versions.clear()
            raise RuntimeError("refused halfway")

        with pytest.raises(RuntimeError):
            await cat.commit(broken, adopter(cat, []))
        assert cat.state is served and list(served.adapters["a"].versions) == ["v1"]

    asyncio.run(scenario())
    assert cat.rows.load().adapters["a"].alias.version == "v1"
    assert cat.rows.load().revision == 1


def test_a_replica_reads_only_newer_rows_and_sees_deletes(db_url: str) -> None:
    a, b = replica(db_url), replica(db_url)

    async def scenario() -> None:
        for name in ("x", "y"):
            await a.commit(adder(name), adopter(a, []))
        b.state = await b.fetch()
        assert set(b.state.adapters) == {"x", "y"} and await b.changes() is None
        await a.commit(adder("z"), adopter(a, []))
        await a.commit(deleter("x"), adopter(a, []))
        newer = await b.changes()
        assert newer is not None and newer.changed == {"x", "z"}  # not y: unchanged
        assert set(newer.adapters) == {"y", "z"} and newer.revision == 4
        b.state = newer
        assert await b.changes() is None

    asyncio.run(scenario())
    assert stored_rows(db_url)["x"] == (4, True)  # a tombstone, for replicas behind


def test_a_change_of_the_counters_alone_reaches_other_replicas(db_url: str) -> None:
    a, b = replica(db_url), replica(db_url)

    async def reserve(state: CatalogState) -> None:
        state.next_lora_id += 5

    async def scenario() -> None:
        await a.commit(reserve, adopter(a, []))
        newer = await b.changes()
        assert newer is not None and (newer.revision, newer.next_lora_id) == (1, 6)
        assert newer.changed == set()
        b.state = newer
        assert await b.changes() is None
        assert await b.commit(adder("x"), adopter(b, [])) == 6

    asyncio.run(scenario())


def test_a_commit_on_a_stale_replica_first_takes_the_newer_rows(db_url: str) -> None:
    a, b = replica(db_url), replica(db_url)
    seen: list[set[str] | None] = []

    async def scenario() -> None:
        assert await a.commit(adder("from-a"), adopter(a, [])) == 1
        assert await b.commit(adder("from-b"), adopter(b, seen)) == 2  # numbered after a's

    asyncio.run(scenario())
    assert seen == [{"from-a", "from-b"}]
    assert set(b.state.adapters) == {"from-a", "from-b"} and b.state.revision == 2


def test_concurrent_changes_from_two_replicas_are_all_kept(db_url: str) -> None:
    """Two replicas in two threads (each its own event loop and connections) commit at once:
    every change is kept, each under its own revision, and no LoRA id is given twice."""
    commits = 15
    ids: dict[str, int] = {}
    errors: list[BaseException] = []
    replicas = {p: replica(db_url) for p in "ab"}

    def run(prefix: str) -> None:
        cat = replicas[prefix]

        async def main() -> None:
            for i in range(commits):
                name = f"{prefix}{i}"
                ids[name] = await cat.commit(adder(name), adopter(cat, []))

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = CatalogRows(Database(db_url)).load()
    assert set(final.adapters) == {f"{p}{i}" for p in "ab" for i in range(commits)}
    assert final.revision == 2 * commits and final.next_lora_id == 2 * commits + 1
    assert sorted(ids.values()) == list(range(1, 2 * commits + 1))
    assert {r.versions["v1"].lora_int_id for r in final.adapters.values()} == set(ids.values())


def test_an_old_registry_document_is_imported_once(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    old = state_with(sql=["v1", "v2"], json=["v1"]).model_copy(update={"revision": 7})
    old.adapters["json"].pinned = True
    CatalogStore(str(path)).save(old)
    cat = RowCatalog(CatalogRows(Database(db_url)), BASE, CatalogStore(str(path)))

    async def scenario() -> CatalogState:
        await cat.prepare()
        return await cat.fetch()

    state = asyncio.run(scenario())
    assert not path.exists() and (tmp_path / "registry.json.imported").exists()
    assert state.revision == 7 and state.next_lora_id == old.next_lora_id
    assert state.model_dump() == old.model_dump()
    CatalogStore(str(path)).save(state_with(other=["v1"]))  # a stray document later: ignored
    asyncio.run(cat.prepare())
    assert set(asyncio.run(cat.fetch()).adapters) == {"sql", "json"} and path.exists()


def test_settings_choose_rows_or_the_document(tmp_path: Path) -> None:
    settings = Settings(registry_uri=str(tmp_path / "r.json"), state_dir=tmp_path / "state")
    rows = open_catalog(settings, BASE)
    assert isinstance(rows, RowCatalog) and rows.rows.db.sqlite_path.startswith(str(tmp_path))
    document = open_catalog(settings.model_copy(update={"registry_document": True}), BASE)
    assert not isinstance(document, RowCatalog) and document.store.uri == settings.registry_uri


# ----- two registries (two replicas) on one database ----------------------------------------
def registries(db_url: str, tmp_path: Path, shapes, poll_s: float = 0) -> list[AdapterRegistry]:
    made = []
    for name in ("a", "b"):
        settings = Settings(
            adapter_roots=[SHIPPED], registry_uri=str(tmp_path / name / "registry.json"),
            state_dir=tmp_path / name, adapter_cache_dir=tmp_path / name / "cache",
            registry_poll_s=poll_s,
        )  # fmt: skip
        made.append(AdapterRegistry(settings, shapes, FakeEngine(), db=Database(db_url)))
    return made


async def poll(registry: AdapterRegistry) -> None:
    """One poll of the registry's loop, now."""
    async with registry._lock:
        state = await registry.catalog.changes()
        if state is not None:
            await registry._adopt(state)


def test_replicas_serve_what_the_other_registered_and_drop_what_it_deleted(
    db_url: str, tmp_path: Path, base_shapes
) -> None:
    a, b = registries(db_url, tmp_path, base_shapes, poll_s=0.2)
    upper, js = str(SHIPPED / "uppercase"), str(SHIPPED / "json")

    async def eventually(check, timeout: float = 10) -> None:
        for _ in range(int(timeout / 0.05)):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the other replica did not follow within its polls")

    async def scenario() -> None:
        await a.restore()
        await b.restore()
        await a.register("persona", upper)
        await a.register("persona", js)  # v2, now the alias
        await eventually(lambda: b.resolve("persona") == AdapterKey("persona", "v2"))
        assert b.residency.engine.exposed.keys() == a.residency.engine.exposed.keys()
        await b.set_alias("persona", "v1")  # and back the other way
        await eventually(lambda: a.resolve("persona") == AdapterKey("persona", "v1"))
        await b.delete("persona", "v2")
        await eventually(lambda: a.resolve("persona@v2") is None)
        assert a.resolve("persona@v1") is not None
        await a.delete("persona")
        await eventually(lambda: b.resolve("persona") is None)
        assert a.names() == b.names() == [] and not b.residency.engine.exposed
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_registrations_on_both_replicas_at_once_are_all_kept(
    db_url: str, tmp_path: Path, base_shapes
) -> None:
    a, b = registries(db_url, tmp_path, base_shapes)
    source = str(SHIPPED / "uppercase")

    async def scenario() -> None:
        await a.restore()
        await b.restore()
        await asyncio.gather(
            *(a.register(f"a{i}", source) for i in range(10)),
            *(b.register(f"b{i}", source) for i in range(10)),
        )
        await poll(a)
        await poll(b)

    asyncio.run(scenario())
    names = sorted(f"{p}{i}" for p in "ab" for i in range(10))
    assert a.names() == b.names() == names
    assert a.residency.engine.exposed == b.residency.engine.exposed  # same LoRA ids on both
    assert sorted(a.residency.engine.exposed.values()) == list(range(1, 21))
    assert json.loads(a.catalog.state.model_dump_json()) == json.loads(
        b.catalog.state.model_dump_json()
    )
