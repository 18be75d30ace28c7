"""Registering many adapters one by one through the registry, on each catalog store.

    python benchmarks/registration.py [--adapters 1000] [--stores document,sqlite,postgresql]

Writes ``--adapters`` tiny valid PEFT adapters for the base model (rank 1, ``v_proj``, seeded;
kept in ``--adapter-dir`` between runs), then for each store registers them all through
:class:`AdapterRegistry` on a stand-in engine, one ``register`` after another as the admin API
does (no vLLM: what is timed is validation, the catalog and the audit log). Stores:
``document``, the JSON document of 0.1.0 (``LORASWAP_REGISTRY_DOCUMENT``); ``sqlite``, the
embedded database; ``postgresql``, a throwaway local cluster (``tests.postgres_server``, fsync
off, so commits cost less than on a durable server). Then times the poll of a second replica
adopting them all. Writes benchmarks/results/registration-<time>.json with the CPU kind and
the load average before and after each store's run (other work on the machine skews the
wall time; ``cpu_seconds`` is this process's own, without PostgreSQL's server processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from servers import ROOT

sys.path.insert(0, str(ROOT))
from loraswap.adapters.registry import AdapterRegistry
from loraswap.adapters.validation import BaseModelShapes
from loraswap.audit import AuditLog
from loraswap.config import Settings
from loraswap.machine import read_cpu
from loraswap.storage import Database
from tests.adapter_factory import write_adapter
from tests.test_residency import FakeEngine

RESULTS = ROOT / "benchmarks" / "results"


def base_shapes() -> BaseModelShapes:
    import bentoml

    return BaseModelShapes.from_checkpoint(
        bentoml.models.get(f"{Settings().base_model}:latest").path
    )


def make_adapters(root: Path, count: int, shapes: BaseModelShapes) -> list[str]:
    names = [f"reg-{i:05d}" for i in range(count)]
    for i, name in enumerate(names):
        if not (root / name / "adapter_config.json").exists():
            write_adapter(root / name, shapes, rank=1, modules=("v_proj",), seed=i)
    return names


@contextlib.contextmanager
def database(store: str, work: Path) -> Iterator[str | None]:
    """The database URL for ``store`` (None: the document)."""
    if store == "document":
        yield None
    elif store == "sqlite":
        yield f"sqlite:///{work / 'loraswap.sqlite'}"
    else:
        from tests import postgres_server

        with postgres_server.postgres() as url:
            yield url


async def measure(store: str, root: Path, names: list[str], shapes: BaseModelShapes) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"loraswap-registration-{store}-"))
    settings = Settings(
        adapter_roots=[root], registry_uri=str(work / "registry.json"), state_dir=work,
        adapter_cache_dir=work / "cache", registry_poll_s=0,
        registry_document=store == "document",
    )  # fmt: skip
    with database(store, work) as url:
        dbs = [Database(url) for _ in range(2)] if url else [None, None]
        audit_db = dbs[0] or Database(f"sqlite:///{work / 'loraswap.sqlite'}")  # as at runtime
        first, second = (
            AdapterRegistry(settings, shapes, FakeEngine(), AuditLog(audit_db), db=db) for db in dbs
        )
        await first.restore()
        await second.restore()
        load, started = os.getloadavg()[0], time.monotonic()  # other work on the machine skews
        cpu = time.process_time()  # this process's CPU (all threads): less skewed by other work
        marks = {}
        for i, name in enumerate(names, 1):
            await first.register(name, str(root / name))
            if i % max(1, len(names) // 4) == 0:
                marks[i] = round(time.monotonic() - started, 2)
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu
        polled = time.monotonic()
        async with second._lock:
            state = await second.catalog.changes()
            assert state is not None
            await second._adopt(state)
        poll_s = time.monotonic() - polled
        assert sorted(second.names()) == names and len(second.model_ids()) == 2 * len(names)
        await first.close()
        for db in {audit_db, *dbs} - {None}:
            db.close()
    result = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
              "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
              "per_registration_ms": round(1000 * seconds / len(names), 2),
              "elapsed_at": marks, "second_replica_poll_s": round(poll_s, 2)}  # fmt: skip
    print(f"{store}: {json.dumps(result)}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--stores", default="document,sqlite,postgresql")
    parser.add_argument(
        "--adapter-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraswap-registration"
    )
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    shapes = base_shapes()
    names = make_adapters(args.adapter_dir, args.adapters, shapes)
    runs = {store: asyncio.run(measure(store, args.adapter_dir, names, shapes))
            for store in args.stores.split(",")}  # fmt: skip
    result = {"started": started.isoformat(timespec="seconds"), "cpu": read_cpu().fingerprint(),
              "adapters": args.adapters, "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"registration-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
