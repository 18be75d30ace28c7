"""The adapter catalogue as rows: one per adapter, and one row of catalogue-wide counters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_meta",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("next_lora_id", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
    )
    op.create_index("adapters_revision", "adapters", ["revision"])


def downgrade() -> None:
    op.drop_table("adapters")
    op.drop_table("catalog_meta")
