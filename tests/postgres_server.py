"""A throwaway PostgreSQL cluster on a free loopback port (PostgreSQL's own ``initdb`` and
``pg_ctl``), for tests that need the real database. Run as an unprivileged user when the tests
run as root, since PostgreSQL refuses root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.server import free_port


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return _program("initdb") is not None and _program("pg_ctl") is not None


def _as_user() -> tuple[list[str], int | None]:
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"], uid
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


@contextmanager
def postgres() -> Iterator[str]:
    """Start a cluster; yield its SQLAlchemy URL (database ``loraswap``); stop and remove it."""
    prefix, uid = _as_user()
    root = Path(tempfile.mkdtemp(prefix="loraswap-pg-"))
    data = root / "data"
    if uid is not None:
        os.chown(root, uid, -1)
    port = free_port()
    run = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    subprocess.run([*prefix, _program("initdb"), "-D", str(data), "-U", "loraswap", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], **run)  # fmt: skip
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -c fsync=off"
    )
    subprocess.run([*prefix, _program("pg_ctl"), "-D", str(data), "-o", options, "-l",
                    str(root / "log"), "-w", "start"], **run)  # fmt: skip
    try:
        import psycopg

        for _ in range(100):
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=loraswap dbname=postgres",
                                     autocommit=True) as conn:  # fmt: skip
                    conn.execute("CREATE DATABASE loraswap")
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        yield f"postgresql://loraswap@127.0.0.1:{port}/loraswap"
    finally:
        subprocess.run([*prefix, _program("pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def new_database(base_url: str, name: str) -> str:
    """A new empty database on the server of ``base_url``; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    dsn = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(url.set(database=name).render_as_string(hide_password=False))
