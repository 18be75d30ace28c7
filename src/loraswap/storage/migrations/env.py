"""Alembic environment: runs on the connection loraswap hands over (``attributes["connection"]``),
or on ``sqlalchemy.url`` when run as ``alembic -x url=... upgrade head``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from loraswap.storage.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=True)  # fmt: skip
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
