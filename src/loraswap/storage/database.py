"""One SQLAlchemy engine for everything durable: SQLite by default, PostgreSQL for a fleet.

Blocking by design: callers on the event loop run store methods in a thread
(``asyncio.to_thread``), so one code path serves both databases and no driver call stalls the
loop. The schema is brought to the newest Alembic revision on first use, under a lock that
replicas starting together share (an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine, make_url

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6C6F7261  # PostgreSQL advisory lock key held while migrating ("lora")


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` use psycopg 3 (the driver we ship)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Database:
    """Connections in transactions; SQLite writers are serialised in-process (one writer is
    all SQLite allows, and waiting on a lock beats retrying ``database is locked``)."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        self.sqlite = self.dialect == "sqlite"
        in_file = self.sqlite and parsed.database not in (None, "", ":memory:")
        self.sqlite_path = parsed.database if in_file else None
        self._lock = threading.RLock()
        self._engine: Engine | None = None
        self._migrated = False

    @classmethod
    def embedded(cls, state_dir: Path) -> Database:
        return cls(f"sqlite:///{Path(state_dir).resolve() / 'loraswap.sqlite'}")

    def _make_engine(self) -> Engine:
        if not self.sqlite:
            return create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        if self.sqlite_path:
            Path(self.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._make_engine()
            if not self._migrated:
                self._migrated = True
                try:
                    self.migrate(self._engine)
                except BaseException:
                    self._migrated = False
                    raise
            return self._engine

    def migrate(self, engine: Engine) -> None:
        """Upgrade the schema to the newest revision (a no-op when it is there)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            if not self.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def revision(self) -> str | None:
        from alembic.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        engine = self.engine
        if self.sqlite:
            with self._lock, engine.begin() as conn:
                yield conn
        else:
            with engine.begin() as conn:
                yield conn

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_*`` on both databases."""
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
                self._migrated = False
