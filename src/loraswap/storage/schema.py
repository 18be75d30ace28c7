"""The tables of everything durable, one schema for SQLite and PostgreSQL.

Changes to these tables go through a new Alembic revision in ``migrations/versions``; the
metadata here is what the newest revision creates (a test compares the two).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()
# 64-bit ids on PostgreSQL; SQLite autoincrements only a column declared INTEGER.
Id = BigInteger().with_variant(Integer, "sqlite")

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("owner", String(255), nullable=True),  # NULL: predates tenants, unrestricted keys
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("body", Text, nullable=False),  # the OpenAI Batch object as JSON
    Column("status", String(32), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("owner", String(255), nullable=True),
    Column("lease_owner", String(255), nullable=True),  # the replica running the job
    Column("lease_expires", Float, nullable=True),  # wall clock; another replica may take it after
    Index("batches_status", "status", "lease_expires"),
)

batch_results = Table(
    "batch_results",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("ok", Boolean, nullable=False),
    Column("output", Text, nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("tenant", String(255), primary_key=True),
    Column("model", String(512), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("source", String(16), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(255)),
    Column("key_id", String(255)),
    Column("action", String(64), nullable=False),
    Column("adapter", String(512)),
    Column("detail", Text),
    Index("audit_adapter", "adapter", "id"),
)

comparisons = Table(
    "comparisons",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("created", Float, nullable=False),
    Column("tenant", String(255)),
    Column("adapter", String(512)),
    Column("primary_version", String(255)),
    Column("shadow_version", String(255)),
    Column("route", String(255)),
    Column("prompt", Text),
    Column("primary_text", Text),
    Column("shadow_text", Text),
    Column("primary_tokens", Integer),
    Column("shadow_tokens", Integer),
    Column("primary_latency_s", Float),
    Column("shadow_latency_s", Float),
    Column("primary_ttft_s", Float),
    Column("shadow_ttft_s", Float),
    Column("identical", Boolean),
    Column("shadow_error", Text),
    Index("comparisons_pair", "adapter", "primary_version", "shadow_version", "id"),
    Index("comparisons_created", "created"),
)

# The adapter catalogue: one row per adapter name, stamped with the catalogue revision of its
# last change, so a replica reads only the rows changed since its own revision.
catalog_meta = Table(
    "catalog_meta",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # one row: id 1
    Column("revision", BigInteger, nullable=False),  # bumped by every change, under this row's lock
    Column("next_lora_id", BigInteger, nullable=False),
)

adapters = Table(
    "adapters",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("record", Text, nullable=False),  # the AdapterRecord as JSON (the last one, if deleted)
    Column("revision", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),  # a tombstone, so other replicas see the delete
    Index("adapters_revision", "revision"),
)

# The tenants directory: one row per tenant (its keys' hashes inside), and the directory's
# revision, bumped by every change under that row's lock.
tenant_meta = Table(
    "tenant_meta",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # one row: id 1
    Column("revision", BigInteger, nullable=False),
)

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("record", Text, nullable=False),  # the Tenant as JSON
)
