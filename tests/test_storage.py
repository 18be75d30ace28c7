"""The storage layer on SQLite and on a real PostgreSQL: migrations, an old state directory
upgraded, leases that one replica wins, lines answered once, usage summed across replicas,
file bytes in a directory and in S3 (moto), and a job taken over from a dead replica."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url

from loraswap.audit import AuditLog
from loraswap.batches import BatchRunner, BatchStore
from loraswap.batches.protocol import new_batch
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.shadows.store import ComparisonStore
from loraswap.storage import Database, FileBytes, Storage, schema
from loraswap.tenants import Tenancy, Tenant
from loraswap.tenants.directory import TenantDirectory, TenantStore
from loraswap.tenants.model import TenantsState
from loraswap.tenants.rows import TenantRows
from loraswap.tenants.usage import UsageLedger
from tests.test_batch_unit import FakePipeline, counts, item, jsonl, start, wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "state_0_1_0"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind (a new PostgreSQL database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    base = request.getfixturevalue("postgres_url")
    name = f"t_{secrets.token_hex(4)}"
    url = make_url(base)
    dsn = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield str(url.set(database=name))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def storage_at(db_url: str, files: Path) -> Storage:
    return Storage(Database(db_url), FileBytes(str(files)), files.parent)


def test_migrations_create_exactly_the_schema(db_url: str) -> None:
    db = Database(db_url)
    assert db.revision() == "0003"
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []
    db.close()
    assert Database(db_url).revision() == "0003"  # a second start migrates nothing


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_a_state_directory_of_0_1_0_upgrades_itself(
    target: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    if target == "sqlite":
        storage = Storage.local(state)
    else:  # the same old directory moved to PostgreSQL and a separate files directory
        db = Database(request.getfixturevalue("postgres_url"))
        with db.begin() as conn:
            for table in reversed(schema.metadata.sorted_tables):
                conn.execute(table.delete())
        storage = Storage(db, FileBytes(str(tmp_path / "bucket")), state)
    storage.prepare()
    assert sorted(p.name for p in state.glob("*.imported")) == [
        "audit.sqlite.imported", "batches.sqlite.imported", "shadows.sqlite.imported",
        "usage.sqlite.imported",
    ]  # fmt: skip
    store = BatchStore(storage)
    files = {f.filename: f for f in store.files()}
    assert set(files) == {"in.jsonl", "legacy.jsonl"}
    assert [f.filename for f in store.files("acme")] == ["in.jsonl"]
    assert store.content(files["in.jsonl"].id).startswith(b'{"custom_id": "a"')
    batches = store.batches()
    assert len(batches) == 2 and len(store.batches("acme")) == 1
    owned = store.batches("acme")[0]
    assert owned.status == "in_progress" and owned.metadata == {"k": "v"}
    assert store.done_lines(owned.id) == {0: True}
    assert sorted(store.claimable()) == sorted(b.id for b in batches)  # both resume
    usage = UsageLedger(storage.db, flush_s=0).report()
    assert {(r["tenant"], r["source"], r["prompt_tokens"]) for r in usage} == {
        ("acme", "api", 10), ("acme", "batch", 3), ("default", "api", 7),
    }  # fmt: skip
    audit = AuditLog(storage.db).entries(lambda _: True)
    assert [e["action"] for e in audit] == ["alias", "register"]
    assert audit[1]["detail"]["source"] == "adapters/uppercase"
    summary = ComparisonStore(storage.db, 30, 1000).summaries(lambda _: True)
    assert summary[0]["count"] == 1 and summary[0]["samples"][0]["shadow_text"] == "hello"
    AuditLog(storage.db).record("register", "new", {})  # ids continue after the imported ones
    assert AuditLog(storage.db).entries(lambda _: True)[0]["adapter"] == "new"
    storage.prepare()  # nothing imported twice
    assert len(BatchStore(storage).batches()) == 2
    storage.close()


def test_one_replica_wins_a_lease_and_another_takes_it_after_expiry(
    db_url: str, tmp_path: Path
) -> None:
    store = BatchStore(storage_at(db_url, tmp_path / "files"))
    batch = new_batch("/v1/completions", "file_x", 1, None)
    store.add_batch(batch)
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def race(replica: str) -> None:
        barrier.wait()
        if store.claim(batch.id, replica, 30):
            wins.append(replica)

    threads = [threading.Thread(target=race, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.claimable() == []
    assert store.renew(batch.id, "other", 30) is None  # only the holder renews
    assert store.renew(batch.id, wins[0], -1) == "validating"  # expire it
    assert store.claimable() == [batch.id]
    assert store.claim(batch.id, "other", 30)
    assert store.renew(batch.id, wins[0], 30) is None  # the old holder learns it lost it
    store.release(batch.id, "other")
    assert store.claimable() == [batch.id]


def test_each_line_is_recorded_once(db_url: str, tmp_path: Path) -> None:
    store = BatchStore(storage_at(db_url, tmp_path / "files"))
    batch = new_batch("/v1/completions", "file_x", 1, None)
    store.add_batch(batch)
    store.record(batch.id, 0, True, "first")
    saved = store.record(batch.id, 0, False, "second")  # a replica that lost its lease
    assert store.done_lines(batch.id) == {0: True}
    assert saved is not None and saved.request_counts.completed == 1
    output, error = store.write_results(batch.id)
    assert error is None and store.content(output.id) == b"first\n"


def test_usage_from_two_replicas_adds_up(db_url: str) -> None:
    a, b = UsageLedger(Database(db_url), flush_s=0), UsageLedger(Database(db_url), flush_s=0)
    for ledger in (a, b, a):
        ledger.record("acme", "m", 10, 5, source="batch")
        ledger.flush()
    rows = b.report("acme")
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (3, 30, 15)
    ]
    assert a.batch_tokens_today("acme") == 45 and b.batch_tokens_today("acme") == 45


def test_file_bytes_in_s3(s3: dict, postgres_url: str) -> None:
    prefix = f"s3://{s3['bucket']}/files-{secrets.token_hex(3)}"
    files = FileBytes(prefix, s3["options"])
    storage = Storage(Database(postgres_url), files, Path("/nonexistent"))
    store = BatchStore(storage)
    made = store.add_file("in.jsonl", "batch", b"x" * 1000)
    assert s3["fs"].cat_file(f"{prefix.removeprefix('s3://')}/{made.id}") == b"x" * 1000
    assert store.content(made.id) == b"x" * 1000
    assert store.delete_file(made.id)
    assert not s3["fs"].exists(f"{prefix.removeprefix('s3://')}/{made.id}")  # bytes gone too
    assert store.content(made.id) is None


class DyingPipeline(FakePipeline):
    """Answers, and marks the moment to kill its replica after ``after`` lines."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.enough = asyncio.Event()

    async def _answer(self, body: dict) -> object:
        if len(self.calls) >= self.after:
            self.enough.set()
            await asyncio.Event().wait()  # this replica hangs from here on, until it dies
        return await super()._answer(body)


def test_a_job_survives_its_replica(db_url: str, tmp_path: Path) -> None:
    """Replica A dies (no release, no more heartbeats) half way through a 200-line job; B takes
    it over when the lease runs out and finishes it: 200 custom_ids, none twice."""

    async def scenario() -> None:
        storage = storage_at(db_url, tmp_path / "files")
        dying = DyingPipeline(after=100)
        a = BatchRunner(dying, BatchStore(storage), 4, replica="a", lease_s=1.5, poll_s=0.2)
        a.store.release = lambda *_: None  # a killed process releases nothing
        batch = await start(a, jsonl(*(item(f"id{i}") for i in range(200))))
        await asyncio.wait_for(dying.enough.wait(), 30)
        for job in list(a.jobs.values()):  # SIGKILL: every task gone at once
            job.task.cancel()
        await asyncio.sleep(0.5)  # a record already in a database thread still lands
        finished_by_a = len(await asyncio.to_thread(a.store.done_lines, batch.id))
        survivor = FakePipeline()
        b_storage = storage_at(db_url, tmp_path / "files")
        b = BatchRunner(survivor, BatchStore(b_storage), 4, replica="b", lease_s=1.5,
                        poll_s=0.2)  # fmt: skip
        b.start_polling()
        done = await wait_for_long(b, batch.id)
        assert done.status == "completed", done
        assert counts(done) == (200, 200, 0)
        out = (await b.content(done.output_file_id, None)).decode().splitlines()
        ids = [json.loads(line)["custom_id"] for line in out]
        assert sorted(ids) == sorted(f"id{i}" for i in range(200))  # each exactly once
        assert len(survivor.calls) == 200 - finished_by_a  # B ran what A had not finished
        await b.close()
        await a.close()

    asyncio.run(scenario())


async def wait_for_long(runner: BatchRunner, batch_id: str) -> object:
    for _ in range(300):
        batch = await runner.batch(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not finished: {batch}")


def test_cancel_from_another_replica_stops_the_job(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        gates = {"id5": asyncio.Event()}
        runner = BatchRunner(FakePipeline(gates), BatchStore(storage_at(db_url, tmp_path / "f")),
                             1, replica="a", lease_s=0.6, poll_s=0.2)  # fmt: skip
        batch = await start(runner, jsonl(*(item(f"id{i}") for i in range(20))))
        other = BatchRunner(FakePipeline(), BatchStore(storage_at(db_url, tmp_path / "f")), 1,
                            replica="b")  # fmt: skip
        await wait_for(runner, batch.id, lambda b: b.request_counts.completed >= 5)
        cancelled = await other.cancel(batch.id)  # through the other replica
        assert cancelled.status == "cancelling"
        gates["id5"].set()
        done = await wait_for_long(runner, batch.id)
        assert done.status == "cancelled" and counts(done)[1] < 20
        await runner.close()
        await other.close()

    asyncio.run(scenario())


def test_counts_stay_exact_when_lines_finish_at_once(db_url: str, tmp_path: Path) -> None:
    """Lines of one job recorded from many threads: the stored counts are the true totals."""
    store = BatchStore(storage_at(db_url, tmp_path / "files"))
    batch = new_batch("/v1/completions", "file_x", 1, None)
    store.add_batch(batch)
    threads = [threading.Thread(target=store.record, args=(batch.id, i, i % 3 != 0, f"o{i}"))
               for i in range(24)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counted = store.batch(batch.id).request_counts
    assert (counted.completed, counted.failed) == (16, 8)


# --- the tenants directory as rows ----------------------------------------------------------
def tenant_directory(db: Database, **settings: object) -> TenantDirectory:
    found = TenantDirectory(Settings(admin_api_keys=["root"], **settings), TenantRows(db))
    found.load()
    return found


def test_two_replicas_changing_tenants_lose_nothing(db_url: str) -> None:
    """Two replicas' directories on one database adding tenants and keys at once: every change
    lands, each a revision, and the other replica sees them at its next poll."""

    async def main() -> None:
        a, b = tenant_directory(Database(db_url)), tenant_directory(Database(db_url))
        await asyncio.gather(
            *(a.create(Tenant(name=f"a{i}")) for i in range(6)),
            *(b.create(Tenant(name=f"b{i}")) for i in range(6)),
        )
        _, plain = await a.add_key("b3", "user")
        stored = TenantRows(Database(db_url)).load()
        assert len(stored.tenants) == 12 and stored.revision == 13
        assert b.authenticate(plain) is None  # not yet polled
        b.settings = b.settings.model_copy(update={"registry_poll_s": 0.01})
        b._checked = 0.0
        b.refresh_if_due()
        await b._refreshing
        assert b.authenticate(plain).tenant.name == "b3"
        await b.delete("a0")
        with pytest.raises(ApiError) as missing:
            await a.update("a0", base_model=False)  # reads the rows, not its own copy
        assert missing.value.status == 404
        assert "a0" not in TenantRows(Database(db_url)).load().tenants

    asyncio.run(main())


def test_a_failed_change_writes_nothing(db_url: str) -> None:
    async def main() -> None:
        directory = tenant_directory(Database(db_url))
        await directory.create(Tenant(name="acme"))
        with pytest.raises(ApiError) as taken:
            await directory.create(Tenant(name="acme"))
        assert taken.value.status == 409
        assert TenantRows(Database(db_url)).load().revision == 1

    asyncio.run(main())


def test_a_tenants_document_is_imported_once(db_url: str, tmp_path: Path) -> None:
    """The document an earlier release (or `tenants_document`) kept becomes rows at the first
    start, its keys still work, and the local file is renamed so it is not read again."""

    async def write_document() -> str:
        settings = Settings(admin_api_keys=["root"], tenants_document=True,
                            tenants_uri=str(tmp_path / "tenants.json"))  # fmt: skip
        document = TenantDirectory(settings, TenantStore(settings.tenants_uri))
        await document.create(Tenant(name="acme", adapters=["acme-*"]))
        return (await document.add_key("acme", "admin"))[1]

    plain = asyncio.run(write_document())
    rows = TenantRows(Database(db_url))
    assert rows.import_document(TenantStore(str(tmp_path / "tenants.json"))) == 1
    assert not (tmp_path / "tenants.json").exists()
    assert (tmp_path / "tenants.json.imported").is_file()
    directory = tenant_directory(rows.db)
    who = directory.authenticate(plain)
    assert who.tenant.name == "acme" and who.admin
    assert rows.import_document(TenantStore(str(tmp_path / "tenants.json"))) == 0


def test_a_server_reads_tenants_from_rows_after_prepare(tmp_path: Path) -> None:
    """Tenancy on the embedded default: the schema and the tenants come with ``prepare``."""
    (tmp_path / "state").mkdir()
    document = TenantStore(str(tmp_path / "state" / "tenants.json"))
    document.save(TenantsState(revision=1, tenants={"acme": Tenant(name="acme")}))
    tenancy = Tenancy(Settings(state_dir=tmp_path / "state", admin_api_keys=["root"]))
    tenancy.prepare()
    assert isinstance(tenancy.directory.store, TenantRows)
    assert list(tenancy.directory.state.tenants) == ["acme"]
    tenancy.storage.close()
