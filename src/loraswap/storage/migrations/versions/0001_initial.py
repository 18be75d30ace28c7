"""The first schema: files, batch jobs with leases, results, usage, audit, shadow comparisons.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires", sa.Float, nullable=True),
    )
    op.create_index("batches_status", "batches", ["status", "lease_expires"])
    op.create_table(
        "batch_results",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("tenant", sa.String(255), primary_key=True),
        sa.Column("model", sa.String(512), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(255)),
        sa.Column("key_id", sa.String(255)),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("adapter", sa.String(512)),
        sa.Column("detail", sa.Text),
    )
    op.create_index("audit_adapter", "audit", ["adapter", "id"])
    op.create_table(
        "comparisons",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("tenant", sa.String(255)),
        sa.Column("adapter", sa.String(512)),
        sa.Column("primary_version", sa.String(255)),
        sa.Column("shadow_version", sa.String(255)),
        sa.Column("route", sa.String(255)),
        sa.Column("prompt", sa.Text),
        sa.Column("primary_text", sa.Text),
        sa.Column("shadow_text", sa.Text),
        sa.Column("primary_tokens", sa.Integer),
        sa.Column("shadow_tokens", sa.Integer),
        sa.Column("primary_latency_s", sa.Float),
        sa.Column("shadow_latency_s", sa.Float),
        sa.Column("primary_ttft_s", sa.Float),
        sa.Column("shadow_ttft_s", sa.Float),
        sa.Column("identical", sa.Boolean),
        sa.Column("shadow_error", sa.Text),
    )
    op.create_index(
        "comparisons_pair", "comparisons", ["adapter", "primary_version", "shadow_version", "id"]
    )
    op.create_index("comparisons_created", "comparisons", ["created"])


def downgrade() -> None:
    for table in ("comparisons", "audit", "usage", "batch_results", "batches", "files"):
        op.drop_table(table)
